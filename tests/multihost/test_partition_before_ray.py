"""A worker silently partitioned while Ray, at health checks slower than the fault, still
counts it alive: the product notices first. Requests that cannot reach the host's
llama-server or model actor are reported; the controller tries the host itself and, when it
cannot reach it either, drops the instance there and places the model on a host it reaches,
and the requests waiting in the lost instance's queue go to the fresh one. After the heal,
the old instance is gone (its kill lands), nothing runs twice, and the host serves again."""

from __future__ import annotations

import time

import httpx

from tests.multihost.cluster import ProductOnHosts, dump
from tests.multihost.history import OK, Background, Window, check, outcomes
from tests.multihost.workload import ANYWHERE_AND_PINNED, ask, warm_and_find

# Ray declares a node dead only after 60 missed health checks (about a minute here, as with
# Ray's defaults on a busy cluster): longer than the product needs, and than the partition.
RAY_ENV = {"RAY_health_check_failure_threshold": "60"}
SETTINGS = {"cooldown": 3600}  # a model back only after a cooldown has failed the test
MODELS = ANYWHERE_AND_PINNED


def test_a_partitioned_worker_is_left_before_ray_declares_it_dead(
    product: ProductOnHosts,
) -> None:
    net = product.net
    with product.client(timeout=60) as http:
        expected, victim, other = warm_and_find(product, http)
        with Background(product.async_client, list(MODELS), deadline=60) as load:
            product.wait_until("the load runs", lambda: len(load.history) > 12, 30)
            cut = time.monotonic()
            net.drop(victim)  # every packet, both ways, without a word
            polls: list[str] = []  # what each look saw: the failure message names them

            def served_elsewhere() -> bool:
                started = time.monotonic()
                try:
                    answer = ask(http, "anywhere")
                    where = product.where(http, "anywhere")
                except httpx.HTTPError as error:
                    polls.append(f"{started - cut:.1f} s: {type(error).__name__}")
                    raise
                polls.append(f"{started - cut:.1f} s: {answer.status_code} from {where}")
                return answer.is_success and where == other

            try:
                moved = product.wait_until(
                    "anywhere answers from the other worker", served_elsewhere, 55
                )
            except AssertionError as error:
                raise AssertionError(f"{error}\npolls: {polls}") from None
            assert victim in product.alive_hosts(http), "Ray noticed first: the test proves nothing"
            refused = ask(http, f"pin-{victim}")  # only the lost host may hold it
            net.heal(victim)
            healed = time.monotonic()
            back = product.wait_until(
                f"pin-{victim} is served again", lambda: ask(http, f"pin-{victim}").is_success, 60
            )
            count = len(load.history)
            product.wait_until("the load goes on", lambda: len(load.history) > count + 30, 60)
        history = load.history
        product.assert_quiet(http, list(MODELS))  # the old instances are gone: no zombie
        assert victim in product.alive_hosts(http)  # Ray never declared it dead

    window = Window(frozenset({"anywhere", f"pin-{victim}"}), cut, healed + back + 1)
    problems = check(history, lambda op: expected, [window])
    numbers = {
        "moved_s": round(moved, 1),
        "back_after_heal_s": round(back, 1),
        "outcomes": outcomes(history),
        "outcomes_by_model": {m: outcomes(o for o in history if o.model == m) for m in MODELS},
    }
    dump(net.root / "numbers-partition-before-ray.json", numbers)
    print(f"partition before Ray notices: {numbers}")
    assert problems == [], problems
    assert refused.status_code == 503, refused.text
    assert all(op.outcome == OK for op in history if op.model == f"pin-{other}")
