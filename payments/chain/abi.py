"""The slice of the EIP-3009 token ABI we use (FiatToken / USDC and the test token agree on it)."""

from eth_utils import function_signature_to_4byte_selector, keccak

BALANCE_OF = function_signature_to_4byte_selector("balanceOf(address)")
AUTHORIZATION_STATE = function_signature_to_4byte_selector("authorizationState(address,bytes32)")
ALLOWANCE = function_signature_to_4byte_selector("allowance(address,address)")
APPROVE = function_signature_to_4byte_selector("approve(address,uint256)")
#: Permit2's unordered nonces: ``nonceBitmap(owner, word)``.
NONCE_BITMAP = function_signature_to_4byte_selector("nonceBitmap(address,uint256)")
#: The x402 upto proxy: ``settle(permit, amount, owner, witness, signature)``.
UPTO_SETTLE_TYPES = ["((address,uint256),uint256,uint256)", "uint256", "address", "(address,address,uint256)", "bytes"]
UPTO_SETTLE = function_signature_to_4byte_selector(f"settle({','.join(UPTO_SETTLE_TYPES)})")
TRANSFER_TOPIC = "0x" + keccak(text="Transfer(address,address,uint256)").hex()
AUTHORIZATION_USED_TOPIC = "0x" + keccak(text="AuthorizationUsed(address,bytes32)").hex()
AUTHORIZATION_CANCELED_TOPIC = "0x" + keccak(text="AuthorizationCanceled(address,bytes32)").hex()

#: The signed EIP-3009 fields, the head of both transferWithAuthorization overloads.
_AUTHORIZATION = [
    {"name": "from", "type": "address"},
    {"name": "to", "type": "address"},
    {"name": "value", "type": "uint256"},
    {"name": "validAfter", "type": "uint256"},
    {"name": "validBefore", "type": "uint256"},
    {"name": "nonce", "type": "bytes32"},
]

TOKEN_ABI = [
    {
        "type": "function",
        "name": "transferWithAuthorization",
        "stateMutability": "nonpayable",
        "inputs": [
            *_AUTHORIZATION,
            {"name": "v", "type": "uint8"},
            {"name": "r", "type": "bytes32"},
            {"name": "s", "type": "bytes32"},
        ],
        "outputs": [],
    },
    {
        "type": "function",
        "name": "transferWithAuthorization",
        "stateMutability": "nonpayable",
        "inputs": [*_AUTHORIZATION, {"name": "signature", "type": "bytes"}],
        "outputs": [],
    },
    {
        "type": "function",
        "name": "balanceOf",
        "stateMutability": "view",
        "inputs": [{"name": "account", "type": "address"}],
        "outputs": [{"name": "", "type": "uint256"}],
    },
    {
        "type": "function",
        "name": "authorizationState",
        "stateMutability": "view",
        "inputs": [{"name": "authorizer", "type": "address"}, {"name": "nonce", "type": "bytes32"}],
        "outputs": [{"name": "", "type": "bool"}],
    },
]

#: BatchSettler.settle(token, to, gasPerItem, items): items are the static struct below.
BATCH_ITEM = "(address,uint256,uint256,uint256,bytes32,uint8,bytes32,bytes32)"
BATCH_SETTLE_TYPES = ["address", "address", "uint256", f"{BATCH_ITEM}[]"]
BATCH_SETTLE = function_signature_to_4byte_selector(f"settle({','.join(BATCH_SETTLE_TYPES)})")
