// SPDX-License-Identifier: MIT
pragma solidity ^0.8.28;

interface IERC20Transfer {
    function transfer(address to, uint256 value) external returns (bool);
}

/// @title The x402 batch-settlement deposit collector for EIP-3009 tokens (USDC), written for
///        the local chain.
/// @notice The payer signs `ReceiveWithAuthorization(from: payer, to: this collector, value,
///         validAfter, validBefore, nonce)` with `nonce = keccak256(abi.encode(channelId, salt))`,
///         so the authorization can only fund that one channel. Only the settlement contract may
///         call `collect`; it passes the channel id it computed from the config, and this contract
///         redeems the authorization (EIP-3009 requires `msg.sender == to`) and forwards the
///         tokens to the settlement contract, which checks its balance grew by `amount`.
/// @dev Placed at the canonical address with `anvil_setCode`: the settlement contract's address is
///      a constant, no constructor state. `collectorData` is
///      `abi.encode(uint256 validAfter, uint256 validBefore, uint256 salt, bytes signature)`.
///      A 65-byte signature goes through the (v, r, s) overload every FiatToken version has; any
///      other length (an EIP-1271 wallet's) through the `bytes` overload of FiatToken v2.2.
contract X402ERC3009DepositCollector {
    address public constant X402_BATCH_SETTLEMENT = 0x4020074e9dF2ce1deE5A9C1b5c3f541D02a10003;

    bytes4 private constant RECEIVE_VRS = bytes4(
        keccak256("receiveWithAuthorization(address,address,uint256,uint256,uint256,bytes32,uint8,bytes32,bytes32)")
    );
    bytes4 private constant RECEIVE_BYTES =
        bytes4(keccak256("receiveWithAuthorization(address,address,uint256,uint256,uint256,bytes32,bytes)"));

    error OnlyX402BatchSettlement();
    error TokenTransferFailed();

    function collect(address payer, address token, uint256 amount, bytes32 channelId, bytes calldata collectorData)
        external
    {
        if (msg.sender != X402_BATCH_SETTLEMENT) revert OnlyX402BatchSettlement();
        if (token.code.length == 0) revert TokenTransferFailed();
        (uint256 validAfter, uint256 validBefore, uint256 salt, bytes memory signature) =
            abi.decode(collectorData, (uint256, uint256, uint256, bytes));
        // The six leading arguments both overloads share, ABI-encoded (the calls are assembled
        // by hand: nine arguments in one call do not fit the legacy code generator's stack).
        bytes memory head = abi.encode(
            payer, address(this), amount, validAfter, validBefore, keccak256(abi.encode(channelId, salt))
        );
        (bool ok, bytes memory answer) = token.call(
            signature.length == 65
                ? bytes.concat(RECEIVE_VRS, head, _vrs(signature))
                : bytes.concat(RECEIVE_BYTES, head, abi.encode(uint256(7 * 32)), _tail(signature))
        );
        if (!ok) {
            assembly {
                revert(add(answer, 32), mload(answer))
            }
        }
        if (!IERC20Transfer(token).transfer(X402_BATCH_SETTLEMENT, amount)) revert TokenTransferFailed();
    }

    /// @dev `abi.encode(v, r, s)` of a 65-byte `r || s || v` signature.
    function _vrs(bytes memory signature) private pure returns (bytes memory) {
        bytes32 r;
        bytes32 s;
        uint8 v;
        assembly {
            r := mload(add(signature, 0x20))
            s := mload(add(signature, 0x40))
            v := byte(0, mload(add(signature, 0x60)))
        }
        return abi.encode(v, r, s);
    }

    /// @dev The ABI tail of a dynamic `bytes` argument: its length, then its data padded to 32 bytes.
    function _tail(bytes memory data) private pure returns (bytes memory) {
        return bytes.concat(abi.encode(data.length), data, new bytes((32 - (data.length % 32)) % 32));
    }
}
