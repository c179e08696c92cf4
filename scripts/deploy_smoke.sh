#!/usr/bin/env bash
# CI stage 2: the production deployment exactly as docs/deploy.md gives it, once, on this host.
#
# A release copy of the checkout (the files git tracks or would, as `git clone` gives them) in a fresh
# directory, a virtual environment holding only requirements.txt, a fresh PostgreSQL database and
# Redis databases of its own, debug off and a strong key, `check --deploy`, `collectstatic`,
# uvicorn with 2 workers, the settlement and prediction workers and beat, a model added the way
# the docs tell an operator. The chain is a local anvil posing as a public one (its own chain id,
# a block every 2 s) where a USDC-like token (EIP-3009) already exists, deployed the way a token
# issuer would, not by the quick start. Then the official x402 client pays once and the payment
# must confirm, with the pay-to balance up by the price. Any failure prints the component logs.
#
#   scripts/deploy_smoke.sh        (needs npm's anvil in node_modules/ and the agent venv,
#                                   `make agent`; both are there after the quick-start smoke)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
W=$ROOT/var/deploy-smoke
PORT=${DEPLOY_SMOKE_PORT:-8100}
CHAIN_PORT=${DEPLOY_SMOKE_CHAIN_PORT:-8645}
CHAIN_ID=84532          # poses as Base Sepolia: the network's default confirmations (2) apply
DB=x402_deploy_smoke
AGENT=${AGENT_PYTHON:-$ROOT/.venv-agent/bin/python}
started=$SECONDS
pids=()

say() { printf '\n== %s (%ss)\n' "$*" "$((SECONDS - started))"; }
finish() {
  local code=$?
  for pid in "${pids[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
  sleep 2
  for pid in "${pids[@]}"; do kill -KILL -- "-$pid" 2>/dev/null || true; done
  if [ "$code" != 0 ]; then
    echo "deploy smoke FAILED (exit $code); component logs:" >&2
    for f in "$W"/log/*.log; do [ -f "$f" ] && { echo "----- $f" >&2; tail -n 60 "$f" >&2; }; done
  else
    rm -rf "$W/app"  # the release copy and its venv; the logs stay
    echo "deploy smoke passed in $((SECONDS - started))s"
  fi
}
trap finish EXIT
start() {  # start NAME COMMAND...: in its own process group, logging to log/NAME.log
  local name=$1; shift
  setsid "$@" >"$W/log/$name.log" 2>&1 &
  pids+=("$!")
}
wait_for() {  # wait_for WHAT SECONDS COMMAND...
  local what=$1 limit=$2; shift 2
  for _ in $(seq 1 "$limit"); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 1
  done
  echo "$what did not come up in ${limit}s" >&2
  return 1
}

say "release copy and its runtime-only environment"
rm -rf "$W" && mkdir -p "$W/app" "$W/log" "$W/secrets"
git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$W/app"
cd "$W/app"
python3 -m venv venv
venv/bin/pip install -q --disable-pip-version-check -r requirements.txt 2>&1 | { grep -v "WARNING: Location" || true; }
venv/bin/pip check
if venv/bin/python -c "import pytest" 2>/dev/null; then echo "the runtime environment holds dev tools" >&2; exit 1; fi
. venv/bin/activate

say "a chain posing as a public one, with a token already on it"
start anvil "$ROOT/node_modules/.bin/anvil" --port "$CHAIN_PORT" --chain-id "$CHAIN_ID" --block-time 2 \
  --accounts 5 --config-out "$W/anvil.json" --silent
RPC=http://127.0.0.1:$CHAIN_PORT
wait_for anvil 30 python -c "import requests; requests.post('$RPC', json={'jsonrpc': '2.0', 'id': 1, 'method': 'eth_chainId', 'params': []}, timeout=2).raise_for_status()"
# anvil's funded accounts: 0 issues the token, 1 relays (the operator's lane), 2 refunds, 3 is the agent.
mapfile -t KEYS < <(python -c "import json; print('\n'.join(json.load(open('$W/anvil.json'))['private_keys']))")
python - "$RPC" "$W/chain.json" "${KEYS[0]}" "${KEYS[2]}" "${KEYS[3]}" <<'PY'
"""The token issuer deploys a USDC-like EIP-3009 token (name "USDC", version "2") and funds the
agent and the refund wallet; the treasury (pay-to) is a fresh address holding nothing."""
import json, sys
from eth_account import Account
from web3 import Web3
from payments.chain import contracts

rpc, out, issuer, refund, agent = sys.argv[1:6]
w3 = Web3(Web3.HTTPProvider(rpc))
token = contracts.deploy(rpc, "TestUSDC", "USDC", "2", private_key=issuer)
mint = w3.eth.contract(address=token, abi=contracts.artifact("TestUSDC")["abi"]).functions
owner = Account.from_key(issuer).address
for who in (Account.from_key(agent).address, Account.from_key(refund).address):
    tx = mint.mint(who, 100 * 10**6).build_transaction({"from": owner, "nonce": w3.eth.get_transaction_count(owner, "pending")})
    w3.eth.wait_for_transaction_receipt(w3.eth.send_raw_transaction(Account.from_key(issuer).sign_transaction(tx).raw_transaction))
chain_id = w3.eth.chain_id
json.dump({"rpc_url": rpc, "chain_id": chain_id, "network": f"eip155:{chain_id}", "asset": token,
           "asset_name": "USDC", "asset_version": "2", "pay_to": Account.create().address,
           "payers": [{"address": Account.from_key(agent).address, "private_key": agent}]},
          open(out, "w"), indent=1)
print("token", token, "on chain", chain_id)
PY
TOKEN=$(python -c "import json; print(json.load(open('$W/chain.json'))['asset'])")
PAY_TO=$(python -c "import json; print(json.load(open('$W/chain.json'))['pay_to'])")

say "settings (docs/deploy.md, section 2 and 3: option A, own relayer)"
echo "${KEYS[1]}" >"$W/secrets/relayer-keys" && chmod 600 "$W/secrets/relayer-keys"
export DJANGO_SECRET_KEY=$(python -c "import secrets; print(secrets.token_urlsafe(64))")
export DJANGO_ALLOWED_HOSTS=127.0.0.1
export DJANGO_CSRF_TRUSTED_ORIGINS=https://127.0.0.1:$PORT
export X402_PUBLIC_URL=https://127.0.0.1:$PORT
export DATABASE_URL=postgres://postgres@127.0.0.1:5432/$DB
export CELERY_BROKER_URL=redis://127.0.0.1:6379/9 CACHE_URL=redis://127.0.0.1:6379/10
export X402_WEBHOOK_SECRET=whsec_$(python -c "import base64,os; print(base64.b64encode(os.urandom(32)).decode())")
export X402_OPERATOR_TOKENS=$(python -c "import secrets; print(secrets.token_urlsafe(32))")
export X402_OPS_TOKENS=$(python -c "import secrets; print(secrets.token_urlsafe(32))")
export X402_TRUSTED_PROXIES=1
export X402_RELAYER_KEY_FILE=$W/secrets/relayer-keys
export X402_REFUND_KEY=${KEYS[2]}
export X402_NETWORK=eip155:$CHAIN_ID X402_RPC_URL=$RPC X402_ASSET=$TOKEN X402_ASSET_NAME=USDC X402_ASSET_VERSION=2
export X402_PAY_TO=$PAY_TO
export X402_EXPORT_DIR=$W/exports DJANGO_STATIC_ROOT=$W/static
unset DJANGO_DEBUG DJANGO_ENV_FILE X402_DEVCHAIN_FILE
redis-cli -n 9 flushdb >/dev/null && redis-cli -n 10 flushdb >/dev/null

say "the database (section 0)"
dropdb -h 127.0.0.1 -U postgres --if-exists --force "$DB"
createdb -h 127.0.0.1 -U postgres "$DB"

say "batched settlement: deploy our BatchSettler (section 3), no Node on the PATH"
settler=$(env PATH="$W/app/venv/bin" /bin/sh -c '! command -v node && python manage.py deploy_batch_settler')
echo "$settler"
export X402_BATCH_SETTLER=$(echo "$settler" | sed -n 's/^BatchSettler deployed at //p')

say "processes (section 4)"
python manage.py check --deploy
python manage.py migrate --noinput -v 0
python manage.py collectstatic --noinput -v 0
DJANGO_SUPERUSER_USERNAME=ops DJANGO_SUPERUSER_EMAIL=ops@example.com DJANGO_SUPERUSER_PASSWORD=$(python -c "import secrets; print(secrets.token_urlsafe(16))") \
  python manage.py createsuperuser --noinput
python manage.py add_model acme/echo --predictor predictions.runners.demo.EchoText \
    --input-schema '{"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}' \
    --output-schema '{"type": "string"}' --price 0.01 --description "Echoes its text"
start web uvicorn x402site.asgi:application --host 127.0.0.1 --port "$PORT" --workers 2 --proxy-headers
start settlement celery -A x402site worker -Q x402-settlement -c 2 -n settlement@%h -l info
start predictions celery -A x402site worker -Q x402 -c 2 -n predictions@%h -l info
start beat celery -A x402site beat -l info -s "$W/celerybeat-schedule"
wait_for "uvicorn /readyz" 60 curl -fsS "http://127.0.0.1:$PORT/readyz"
wait_for "the settlement worker" 60 grep -q "settlement@.* ready" "$W/log/settlement.log"
wait_for "the prediction worker" 60 grep -q "predictions@.* ready" "$W/log/predictions.log"
wait_for "beat" 30 grep -q "beat: Starting" "$W/log/beat.log"
curl -fsS "http://127.0.0.1:$PORT/static/admin/css/base.css" -o /dev/null -H "X-Forwarded-Proto: https"

say "the official x402 client pays once (TLS ends at a proxy: X-Forwarded-Proto)"
before=$(python -c "
from web3 import Web3; from payments.chain import contracts
w3 = Web3(Web3.HTTPProvider('$RPC'))
print(w3.eth.contract(address='$TOKEN', abi=contracts.artifact('TestUSDC')['abi']).functions.balanceOf('$PAY_TO').call())")
"$AGENT" "$ROOT/examples/agent_pay.py" --base-url "http://127.0.0.1:$PORT" --devchain "$W/chain.json" \
  --model acme/echo --header X-Forwarded-Proto:https --confirmed --timeout 120 "deployed as documented"
after=$(python -c "
from web3 import Web3; from payments.chain import contracts
w3 = Web3(Web3.HTTPProvider('$RPC'))
print(w3.eth.contract(address='$TOKEN', abi=contracts.artifact('TestUSDC')['abi']).functions.balanceOf('$PAY_TO').call())")
echo "pay-to balance $before -> $after"
[ "$((after - before))" = 10000 ]

say "every component still up"
for pid in "${pids[@]}"; do kill -0 "$pid"; done
curl -fsS "http://127.0.0.1:$PORT/readyz" -H "Authorization: Bearer $X402_OPS_TOKENS"; echo
