// SPDX-License-Identifier: MIT
pragma solidity ^0.8.20;

/// @title MockERC1271Wallet: a minimal smart-contract wallet for tests.
/// @notice It approves any hash its owner signed (EIP-1271), the way smart wallets let
///         contracts act as payers of EIP-3009 authorizations.
contract MockERC1271Wallet {
    address public immutable owner;
    bytes4 private constant MAGIC = 0x1626ba7e;

    constructor(address owner_) {
        owner = owner_;
    }

    function isValidSignature(bytes32 hash, bytes memory signature) external view returns (bytes4) {
        if (signature.length != 65) return 0xffffffff;
        bytes32 r;
        bytes32 s;
        uint8 v;
        assembly {
            r := mload(add(signature, 0x20))
            s := mload(add(signature, 0x40))
            v := byte(0, mload(add(signature, 0x60)))
        }
        if (uint256(s) > 0x7FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF5D576E7357A4501DDFE92F46681B20A0) return 0xffffffff;
        return ecrecover(hash, v, r, s) == owner ? MAGIC : bytes4(0xffffffff);
    }
}
