"""Does a TenSEAL sealapi call release the GIL? A load-independent probe.

    .venv/bin/python benchmarks/gil_probe.py

Thread A runs 5 calls of an operation; thread B spins in pure Python. The interpreter's switch
interval is set to 0.5 s. If the call releases the GIL, B grabs it during A's call and A waits
up to 0.5 s to get it back after every call (>= ~2.5 s in total); if the call holds the GIL, A
only loses it once to B's start (~0.5 s). ``time.sleep`` is the positive control. The answer
does not depend on how loaded the machine is, unlike a two-thread speed-up test.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable

import numpy as np
import tenseal.sealapi as sa

from tip_fed.crypto import HEParams, SessionKeys, encrypt_query, load_public_context, plan_packing
from tip_fed.crypto.codec import ciphertext_from_bytes


def probe(op: Callable[[], object], calls: int = 5, interval: float = 0.5) -> float:
    """Seconds thread A needs for ``calls`` calls while thread B spins."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(interval)
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            pass

    def work() -> None:
        for _ in range(calls):
            op()

    a, b = threading.Thread(target=work), threading.Thread(target=spin)
    t0 = time.perf_counter()
    a.start()
    b.start()
    a.join()
    seconds = time.perf_counter() - t0
    stop.set()
    b.join()
    sys.setswitchinterval(old)
    return seconds


def main() -> None:
    plan = plan_packing(1024, 1024, HEParams())
    keys = SessionKeys.generate(plan)
    ctx = load_public_context(keys.public_context_bytes(), plan.params)
    h = ctx.handles
    ct = ciphertext_from_bytes(h.seal_context, plan.params, encrypt_query(keys, plan, np.ones(1024) / 32)[0],
                               what="query", parms_id=h.first_parms_id, scale=plan.params.global_scale)
    values = np.random.default_rng(0).uniform(-1, 1, plan.slots).tolist()
    pt, out = sa.Plaintext(), sa.Ciphertext()
    h.encoder.encode(values, h.first_parms_id, plan.params.global_scale, pt)
    ops = {
        "Evaluator.rotate_vector": lambda: h.evaluator.rotate_vector(ct, 4, ctx.galois_keys, out),
        "Evaluator.multiply_plain": lambda: h.evaluator.multiply_plain(ct, pt, out),
        "CKKSEncoder.encode": lambda: h.encoder.encode(values, h.first_parms_id, plan.params.global_scale,
                                                       sa.Plaintext()),
        "time.sleep(0.01) (control: releases)": lambda: time.sleep(0.01),
    }
    for name, op in ops.items():
        seconds = probe(op)
        print(f"{name:40s} {seconds:5.2f} s -> GIL {'released' if seconds > 2.0 else 'held'}")
    keys.destroy()


if __name__ == "__main__":
    main()
