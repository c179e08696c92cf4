// SPDX-License-Identifier: MIT
pragma solidity ^0.8.20;

/// The EIP-3009 entry point of FiatToken (USDC) and of contracts/TestUSDC.sol.
interface IEIP3009 {
    function transferWithAuthorization(
        address from, address to, uint256 value, uint256 validAfter, uint256 validBefore,
        bytes32 nonce, uint8 v, bytes32 r, bytes32 s
    ) external;
}

/// @title BatchSettler: many EIP-3009 transferWithAuthorization calls in one transaction.
/// @notice Each authorization is settled in its own call, inside try/catch: one that was already
///         used, has expired or is not covered by its payer's balance fails alone, and the others
///         still move. Each call gets at most `gasPerItem` gas, so one payer (a contract wallet
///         that burns gas, say) cannot starve the rest of the batch.
///         The contract holds nothing and has no owner: the token moves exactly what each payer
///         signed (from, to, value), so anyone may call it; whether a payment was made is read
///         from the token's own AuthorizationUsed and Transfer logs in the receipt.
///         Items are static structs (no dynamic bytes) to keep calldata small; all items of a
///         batch pay the same `to` on the same token.
contract BatchSettler {
    struct Authorization {
        address from;
        uint256 value;
        uint256 validAfter;
        uint256 validBefore;
        bytes32 nonce;
        uint8 v;
        bytes32 r;
        bytes32 s;
    }

    /// @return ok whether each item's transfer succeeded (for simulation with eth_call).
    function settle(IEIP3009 token, address to, uint256 gasPerItem, Authorization[] calldata items)
        external
        returns (bool[] memory ok)
    {
        ok = new bool[](items.length);
        for (uint256 i; i < items.length; ++i) {
            Authorization calldata a = items[i];
            try token.transferWithAuthorization{gas: gasPerItem}(
                a.from, to, a.value, a.validAfter, a.validBefore, a.nonce, a.v, a.r, a.s
            ) {
                ok[i] = true;
            } catch {}
        }
    }
}
