"""``tip-fed seller serve`` keeps its privacy ledger in a file by default: a restart is no fresh budget.

Real processes on 127.0.0.1 (insecure: a buyer is its address, 127.0.0.1, whatever its keys and session), each stopped
by the test, by PID. A buyer that gets its one exact answer cannot get another by waiting for the
service to restart (a crash, an upgrade, an operator's routine).
"""

import shutil
import subprocess

import pytest

from tip_fed.grpc import SellerEndpoint, value_sellers, wait_until_healthy
from tip_fed.protocol.data import save_dataset
from tip_fed.protocol.ledger import PrivacyLedger, default_ledger

from ..conftest import make_data
from .serving import TIP_FED, serving

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _exact_session(data, make_buyer):
    """One new buyer (fresh keys, new session) asks the seller serving ``data`` for one exact aggregate
    answer; (seller ids answered, failures)."""
    with serving(["--data", str(data), "--insecure", "--port", "0"]) as (ready, _):
        endpoint = SellerEndpoint(ready["id"], f"127.0.0.1:{ready['port']}")
        wait_until_healthy(endpoint, tls=None, insecure=True, timeout_s=60)
        replies, failures = value_sellers([endpoint], make_buyer("aggregate").offer(max_samples=100),
                                          insecure=True, timeout_s=120, retries=0)
    return sorted(replies), failures


def test_a_restarted_seller_refuses_the_exact_answer_its_buyer_already_had(tmp_path, make_buyer):
    data = save_dataset(make_data(30, 4), tmp_path / "clinic.safetensors")
    assert _exact_session(data, make_buyer) == (["clinic"], {})
    ledger = default_ledger(data)
    assert ledger == tmp_path / "clinic.safetensors.ledger.json"  # beside the data, no flag given
    assert PrivacyLedger(ledger).spent_total() == (0.0, 1)

    answered, failures = _exact_session(data, make_buyer)  # the same data, a new process, a new buyer
    assert answered == [] and "--max-exact" in failures["clinic"], failures
    assert PrivacyLedger(ledger).spent_total() == (0.0, 1)  # the refusal charged nothing

    fresh = tmp_path / "fresh"  # control: the same records without that ledger are answered
    fresh.mkdir()
    copy = shutil.copy(data, fresh / "clinic.safetensors")
    assert _exact_session(copy, make_buyer) == (["clinic"], {})


def test_a_ledger_that_cannot_be_written_stops_the_seller_at_start(tmp_path):
    data = save_dataset(make_data(3, 1), tmp_path / "clinic.safetensors")
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the ledger's directory should be\n")
    run = subprocess.run([TIP_FED, "seller", "serve", "--data", str(data), "--insecure", "--port", "0",
                          "--ledger", str(blocker / "ledger.json")], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "ready on" not in run.stdout, run.stdout + run.stderr
    assert run.stderr.startswith("tip-fed: error: privacy ledger ") and run.stderr.count("\n") == 1, run.stderr
    assert "--ledger" in run.stderr and str(blocker / "ledger.json") in run.stderr
