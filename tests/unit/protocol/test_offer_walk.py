"""The Offer's walk through the library: Buyer.offer -> Seller.respond -> Buyer.settle, module by module.

A reader following an Offer should pass each module once. The walk is traced with ``sys.setprofile``
over tip_fed's modules except the gradient math (``tip_fed.core``) and the generated wire code: a
*stop* is a call from one of these modules into another, a *revisit* a stop into a module already
passed in that leg. Property getters, comprehensions and generated dataclass methods belong to
their caller's step, and a loop is read once (a call site calling the same function again, with
all that call does, is a step already read). The walk asserted is the protocol layer's: the
modules ``tip_fed.protocol`` calls; what crypto does inside one of those calls (keys, codec and
params calling each other) is bounded separately. Deterministic: it counts calls, never time."""

from __future__ import annotations

import inspect
import sys
from collections import Counter
from collections.abc import Callable
from types import CodeType
from typing import Any

from tip_fed.protocol import Seller, SellerPolicy
from tip_fed.protocol.disclosure import NoisePolicy
from tip_fed.protocol.ledger import LedgerPolicy
from tip_fed.protocol.model_cache import strip_weights

#: The modules the protocol layer calls in each leg (without the ``tip_fed.`` prefix).
MODULES = {
    "offer": {"crypto.params", "crypto.keys", "crypto.packing", "protocol.offer"},
    "respond": {
        "protocol.offer", "protocol.messages", "crypto.params", "protocol.sessions", "protocol.model_cache",
        "protocol.resources", "crypto.costs", "crypto.keys", "protocol.model", "protocol.disclosure",
        "protocol.ledger", "protocol.data", "protocol.commitment", "crypto.packing", "protocol.reply", "crypto.query",
    },
    "settle": {"protocol.reply", "protocol.messages", "crypto.packing", "protocol.disclosure", "crypto.keys",
               "crypto.params"},
}
#: The modules a leg may enter again, each with its reason (a later step that cannot be merged with the
#: first, as costing must come before allocating). A step computes what later steps need and hands it on
#: as a value (the seller's Release, the header costing read, a block's layout); none is left.
REVISITS: dict[str, dict[str, list[str]]] = {"offer": {}, "respond": {}, "settle": {}}
#: Most steps crypto takes inside the protocol's calls (its own modules calling each other).
#: (respond: the imaginary pad, crypto.sanitise, reads and rewrites a reply through crypto.codec: 7 steps)
CRYPTO_STEPS = {"offer": 7, "respond": 33, "settle": 5}


def _named(leg: str) -> Counter[str]:
    """The revisits ``leg`` may make: one per reason named in REVISITS."""
    return Counter({m: len(why) for m, why in REVISITS[leg].items()})


def _ours(module: str) -> bool:
    return module.startswith("tip_fed.") and not module.startswith(("tip_fed.core", "tip_fed.wire"))


def _reads() -> set[CodeType]:
    """Code of every property getter of tip_fed's classes: reading an attribute is not a step."""
    codes = set()
    for name, module in list(sys.modules.items()):
        if name.startswith("tip_fed"):
            for _, cls in inspect.getmembers(module, inspect.isclass):
                codes.update(a.fget.__code__ for a in vars(cls).values() if isinstance(a, property) and a.fget)
    return codes


Step = tuple[str, str]  # (caller's module, callee's module), without the ``tip_fed.`` prefix


def trace(fn: Callable[[], Any]) -> tuple[Any, list[Step], list[Step]]:
    """``fn()``'s result; the modules its calls stop at in order, with a loop read once (a call site
    calling the same function again, and all that call does, is a step already read); and every
    stop, each turn of a loop counted."""
    reads: set[CodeType] = _reads()
    # per frame: its module, the functions it has called, whether it repeats a call already read
    stack: list[tuple[str, set[CodeType], bool]] = []
    steps: list[Step] = []
    stops: list[Step] = []

    def profile(frame: Any, event: str, _arg: Any) -> None:
        if event not in ("call", "return"):
            return
        code, module = frame.f_code, frame.f_globals.get("__name__", "")
        if code in reads or code.co_filename.startswith("<") or code.co_name.startswith("<"):
            module = stack[-1][0] if stack else module  # part of the caller's step
        if event == "return":
            if stack:
                stack.pop()
            return
        repeat = False
        if stack:
            caller, called, repeat = stack[-1]
            repeat = repeat or code in called
            called.add(code)
            if module != caller and _ours(module) and _ours(caller):
                step = (caller.removeprefix("tip_fed."), module.removeprefix("tip_fed."))
                stops.append(step)
                if not repeat:
                    steps.append(step)
        stack.append((module, set(), repeat))

    previous = sys.getprofile()
    sys.setprofile(profile)
    try:
        result = fn()
    finally:
        sys.setprofile(previous)
    return result, steps, stops


def revisits(modules: list[str]) -> Counter[str]:
    """How often each module is entered again after its first stop."""
    counts = Counter(modules)
    return Counter({m: n - 1 for m, n in counts.items() if n > 1})


def protocol_walk(steps: list[Step]) -> list[str]:
    """The modules the protocol layer calls, in order: the walk a reader of the Offer follows
    (what crypto does inside one of its calls is crypto's own business)."""
    return [callee for caller, callee in steps if caller.startswith("protocol.")]


def legs(buyer: Any, seller: Seller) -> dict[str, tuple[list[Step], list[Step]]]:
    """Each leg of one Offer's walk (per-sample disclosure, one seller): (steps, every stop)."""
    offer, *offer_walk = trace(lambda: buyer.offer(max_samples=100))
    reply, *respond_walk = trace(lambda: seller.respond(offer))
    valuation, *settle_walk = trace(lambda: buyer.settle([reply]))
    assert valuation.rejected == {} and len(valuation.sellers) == 1
    return {"offer": tuple(offer_walk), "respond": tuple(respond_walk), "settle": tuple(settle_walk)}


def test_the_tracer_counts_stops_reads_a_loop_once_and_names_revisits():
    import torch

    from tip_fed.protocol import disclosure

    # a call from this (non-library) module is no stop
    _, steps, stops = trace(lambda: [disclosure.release_quantum(1.0, d) for d in (2, 3)])
    assert steps == stops == []
    # a library module calling another is; the same call again (a loop) is read once
    _, steps, stops = trace(lambda: disclosure.round_release(torch.zeros(3).numpy(), 0.5))
    assert steps == stops == []
    _, steps, _ = trace(lambda: Seller("s", {"x": torch.zeros(2, 3)}))
    assert ("protocol.seller", "protocol.data") in steps
    assert revisits(["a", "b", "a", "a"]) == Counter({"a": 2})


def test_an_offer_passes_each_module_once_but_for_named_later_steps(make_buyer, seller_data):
    buyer = make_buyer("per-sample")
    seller = Seller("s1", seller_data["s1"], policy=SellerPolicy(exact_per_sample=True))
    for leg, (steps, _) in legs(buyer, seller).items():
        walk = protocol_walk(steps)
        assert set(walk) == MODULES[leg], (leg, walk)
        assert revisits(walk) == _named(leg), (leg, " > ".join(walk))
        inside = [callee for caller, callee in steps if not caller.startswith("protocol.")]
        assert len(inside) <= CRYPTO_STEPS[leg], (leg, inside)


def test_a_noisy_answer_passes_disclosure_once(make_buyer, seller_data):
    """The noise is decided, its seed committed to and the noise drawn in one step before the ledger
    is charged; scoring adds it without going back to disclosure."""
    buyer = make_buyer("per-sample")
    seller = Seller("s1", seller_data["s1"], policy=SellerPolicy(noise=NoisePolicy(1.0)))
    offer = buyer.offer(max_samples=100)
    reply, steps, _ = trace(lambda: seller.respond(offer))
    walk = protocol_walk(steps)
    assert walk.count("protocol.disclosure") == 1 and revisits(walk) == _named("respond"), steps
    valued = buyer.settle([reply]).sellers[0]
    assert valued.noise is not None and valued.noise["epsilon"] == 1.0 and len(valued.noise["commitment"]) == 64


def test_a_referenced_model_passes_the_model_cache_once(make_buyer, seller_data):
    """A reference is resolved before costing (its held header is what is costed); a shipped model is
    admitted once built: each Offer enters the cache for one of the two, never both."""
    buyer = make_buyer("per-sample")
    uncapped = LedgerPolicy(max_exact=None, total_max_exact=None)  # two exact answers to one buyer
    policy = SellerPolicy(exact_per_sample=True, model_cache_mb=16, lifetime=uncapped)
    seller = Seller("s1", seller_data["s1"], policy=policy)
    seller.respond(buyer.offer(max_samples=100))  # ships the weights: held for this buyer from now on
    reference = strip_weights(buyer.offer(max_samples=100))
    reply, steps, _ = trace(lambda: seller.respond(reference))
    walk = protocol_walk(steps)
    assert walk.count("protocol.model_cache") == 1 and revisits(walk) == _named("respond"), steps
    assert buyer.settle([reply]).rejected == {}
