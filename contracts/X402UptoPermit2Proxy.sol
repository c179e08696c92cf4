// SPDX-License-Identifier: MIT
pragma solidity ^0.8.20;

interface IPermit2WitnessTransfer {
    struct TokenPermissions {
        address token;
        uint256 amount;
    }

    struct PermitTransferFrom {
        TokenPermissions permitted;
        uint256 nonce;
        uint256 deadline;
    }

    struct SignatureTransferDetails {
        address to;
        uint256 requestedAmount;
    }

    function permitWitnessTransferFrom(
        PermitTransferFrom calldata permit,
        SignatureTransferDetails calldata transferDetails,
        address owner,
        bytes32 witness,
        string calldata witnessTypeString,
        bytes calldata signature
    ) external;
}

/// @title The x402 `upto` settlement proxy, written for the local chain.
/// @notice The spender payers name in their Permit2 signature. The signed witness binds the
///         destination (`to`), the only caller allowed to settle (`facilitator`) and the earliest
///         settlement time (`validAfter`); the caller picks the amount, at most the signed maximum.
///         `settle(permit, amount, owner, witness, signature)` is the x402 SDK's ABI.
/// @dev Placed at the canonical address with `anvil_setCode`: Permit2's address is a constant and
///      the reentrancy lock's storage starts at zero, so no constructor or initializer is needed.
contract X402UptoPermit2Proxy {
    struct Witness {
        address to;
        address facilitator;
        uint256 validAfter;
    }

    address public constant PERMIT2 = 0x000000000022D473030F116dDEE9F6B43aC78BA3;
    string public constant WITNESS_TYPE_STRING =
        "Witness witness)TokenPermissions(address token,uint256 amount)Witness(address to,address facilitator,uint256 validAfter)";
    bytes32 public constant WITNESS_TYPEHASH = keccak256("Witness(address to,address facilitator,uint256 validAfter)");

    uint256 private _locked;

    event Settled();

    error AmountExceedsPermitted();
    error InvalidAmount();
    error InvalidOwner();
    error InvalidDestination();
    error UnauthorizedFacilitator();
    error PaymentTooEarly();
    error Reentrancy();

    function settle(
        IPermit2WitnessTransfer.PermitTransferFrom calldata permit,
        uint256 amount,
        address owner,
        Witness calldata witness,
        bytes calldata signature
    ) external {
        if (_locked != 0) revert Reentrancy();
        _locked = 1;
        if (amount > permit.permitted.amount) revert AmountExceedsPermitted();
        if (amount == 0) revert InvalidAmount();
        if (owner == address(0)) revert InvalidOwner();
        if (witness.to == address(0)) revert InvalidDestination();
        if (msg.sender != witness.facilitator) revert UnauthorizedFacilitator();
        if (block.timestamp < witness.validAfter) revert PaymentTooEarly();
        bytes32 witnessHash =
            keccak256(abi.encode(WITNESS_TYPEHASH, witness.to, witness.facilitator, witness.validAfter));
        IPermit2WitnessTransfer(PERMIT2).permitWitnessTransferFrom(
            permit,
            IPermit2WitnessTransfer.SignatureTransferDetails({to: witness.to, requestedAmount: amount}),
            owner,
            witnessHash,
            WITNESS_TYPE_STRING,
            signature
        );
        _locked = 0;
        emit Settled();
    }
}
