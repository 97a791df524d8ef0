"""The RAM/VRAM residency LRU with fakes of known byte size: order, pins, tiers, shared parts, stats."""

from __future__ import annotations

import threading

import pytest

from model_cache.residency import RAM, VRAM, Residency, check_budget, resolve_budget

MB = 1 << 20


class Fake:
    """A 'model' of known size made of named parts; records where it is."""

    def __init__(self, name: str, parts: dict[str, int]):
        self.name, self.parts, self.where, self.dropped = name, parts, "device", False


class World:
    """Loads and callbacks that log what happened, around one Residency."""

    def __init__(self, ram: int, vram: int | None):
        self.log: list[tuple[str, str]] = []
        self.loads: list[str] = []
        self.trims = 0
        self.clock = 0.0
        self.res = Residency(
            ram_budget=ram, device_budget=vram,
            parts=lambda f: f.parts,
            drop=self._drop,
            to_ram=self._to_ram if vram is not None else None,
            to_device=self._to_device if vram is not None else None,
            after_drop=self._trim,
            clock=self._tick,
        )

    def _tick(self) -> float:
        self.clock += 1.0
        return self.clock

    def _drop(self, f: Fake) -> None:
        f.dropped = True
        self.log.append(("drop", f.name))

    def _to_ram(self, f: Fake, staying: list) -> None:
        self.staying = [x.name for x in staying]
        f.where = "cpu"
        self.log.append(("to_ram", f.name))

    def _to_device(self, f: Fake) -> None:
        f.where = "device"
        self.log.append(("to_device", f.name))

    def _trim(self) -> None:
        self.trims += 1

    def use(self, name: str, size: int = 100 * MB, parts: dict[str, int] | None = None, estimate: int = 0):
        """One job on ``name``: acquire (loading a fake when missing), then release."""
        def load():
            self.loads.append(name)
            return Fake(name, parts or {name: size})

        value, event = self.res.acquire(name, load, estimate=estimate, label=name)
        self.res.release(name)
        return value, event


def test_cpu_only_is_one_lru_tier_in_ram_order():
    w = World(ram=300 * MB, vram=None)
    assert w.res.unified and w.res.top == RAM and set(w.res.budgets) == {RAM}
    for name in "ABC":
        w.use(name)
    w.use("A")  # A becomes most recent: B is now the oldest
    _, event = w.use("D")
    assert w.log == [("drop", "B")]
    assert event.source == "load" and [e["name"] for e in event.evicted] == ["B"]
    assert w.res.keys(RAM) == ["C", "A", "D"]
    assert w.loads == ["A", "B", "C", "D"]  # the second A was a hit: not loaded again
    assert w.trims == 1  # memory handed back once per eviction round
    stats = w.res.snapshot()["tiers"][RAM]
    assert (stats["hits"], stats["misses"], stats["evictions"], stats["bytes_evicted"]) == (1, 4, 1, 100 * MB)
    assert stats["used"] == 300 * MB and stats["budget"] == 300 * MB


def test_estimate_makes_room_before_the_load():
    w = World(ram=300 * MB, vram=None)
    w.use("A"), w.use("B")
    seen_at_load = []

    def load():
        seen_at_load.append(w.res.keys(RAM))
        return Fake("C", {"C": 200 * MB})

    w.res.acquire("C", load, estimate=200 * MB, label="C")
    assert seen_at_load == [["B"]]  # A went before C was read: never budget + a new model at once


def test_pinned_entry_is_never_evicted_even_over_budget():
    w = World(ram=250 * MB, vram=None)
    w.res.acquire("A", lambda: Fake("A", {"A": 100 * MB}), label="A")  # a job holds A
    w.use("B")
    _, event = w.use("C")
    assert ("drop", "A") not in w.log and w.log == [("drop", "B")]
    _, event = w.use("D", size=300 * MB)  # cannot fit beside A: runs over budget, A still held
    assert "A" in w.res and event.over_budget
    w.res.release("A")
    w.use("E", size=10 * MB)
    assert "A" not in w.res  # once released it is ordinary LRU again


def test_device_tier_moves_to_ram_then_drops():
    w = World(ram=200 * MB, vram=100 * MB)
    assert not w.res.unified and w.res.top == VRAM
    a, _ = w.use("A")
    assert w.res.tier_of("A") == VRAM and a.where == "device"
    w.use("B")
    assert w.log == [("to_ram", "A")] and a.where == "cpu" and w.res.tier_of("A") == RAM
    w.log.clear()
    a2, event = w.use("A")  # RAM hit: back to the device, no load
    assert a2 is a and event.source == RAM and w.loads == ["A", "B"]
    assert w.log == [("to_ram", "B"), ("to_device", "A")]
    assert w.staying == ["A"]  # A was coming to the device while B left it
    assert "to_device" in event.times
    w.use("C"), w.use("D")  # RAM holds 2: the oldest of the RAM tier goes
    assert ("drop", "B") in w.log and w.res.keys(VRAM) == ["D"] and w.res.keys(RAM) == ["A", "C"]
    snap = w.res.snapshot()["tiers"]
    assert snap[VRAM]["hits"] == 0 and snap[RAM]["hits"] == 1 and snap[VRAM]["misses"] == 5
    assert snap[VRAM]["evictions"] == 4 and snap[RAM]["evictions"] == 1


def test_shared_part_is_counted_once_and_not_in_ram_while_on_device():
    w = World(ram=1000 * MB, vram=1000 * MB)
    w.use("A", parts={"unet-a": 300 * MB, "vae": 100 * MB})
    w.use("B", parts={"unet-b": 300 * MB, "vae": 100 * MB})
    assert w.res.used(VRAM) == 700 * MB  # one VAE
    w2 = World(ram=1000 * MB, vram=350 * MB)
    w2.use("A", parts={"unet-a": 300 * MB, "vae": 40 * MB})
    w2.use("B", parts={"unet-b": 300 * MB, "vae": 40 * MB})
    # A went to RAM, but its VAE is B's too and stays on the device: counted there only
    assert w2.res.keys(RAM) == ["A"] and w2.res.used(RAM) == 300 * MB and w2.res.used(VRAM) == 340 * MB


def test_refresh_weighs_again_and_evicts():
    w = World(ram=300 * MB, vram=None)
    w.use("A"), w.use("B")
    b, _ = w.res.acquire("B", lambda: None)
    b.parts["lora"] = 150 * MB  # a LoRA loaded into B during its job
    event = w.res.refresh("B")
    assert [e["name"] for e in event.evicted] == ["A"] and w.res.used(RAM) == 250 * MB


def test_snapshot_answers_while_a_load_runs():
    w = World(ram=300 * MB, vram=None)
    w.use("A")
    started, finish = threading.Event(), threading.Event()

    def slow_load():
        started.set()
        finish.wait(5)
        return Fake("B", {"B": 10 * MB})

    t = threading.Thread(target=lambda: w.res.acquire("B", slow_load, label="B"))
    t.start()
    assert started.wait(5)
    snap = w.res.snapshot()  # must not wait for the load
    assert [e["name"] for e in snap["tiers"][RAM]["entries"]] == ["A"]
    finish.set()
    t.join(5)
    entries = w.res.snapshot()["tiers"][RAM]["entries"]
    assert [(e["name"], e["pinned"]) for e in entries] == [("A", False), ("B", True)]


def test_clear_drops_all_but_pinned():
    w = World(ram=1000 * MB, vram=None)
    w.use("A"), w.use("B")
    w.res.acquire("C", lambda: Fake("C", {"C": 1}), label="C")
    w.res.clear()
    assert w.res.keys(RAM) == ["C"] and sorted(n for _, n in w.log) == ["A", "B"]


def test_device_tier_needs_both_moves():
    with pytest.raises(ValueError, match="to_ram and to_device"):
        Residency(ram_budget=1, device_budget=1, parts=dict, drop=lambda v: None)


@pytest.mark.parametrize(("value", "expected"), [("auto", 7), ("50%", 500), ("2KiB", 2048), ("1048576", 1 << 20), ("0", 0)])
def test_budget_settings(value, expected):
    assert resolve_budget(value, total=1000, auto=7) == expected


@pytest.mark.parametrize("value", ["lots", "150%", "-1", "12 parsecs"])
def test_bad_budget_settings(value):
    with pytest.raises(ValueError):
        check_budget(value)


def test_clear_drops_device_entries_without_a_stop_in_ram():
    w = World(ram=1000 * MB, vram=1000 * MB)
    w.use("A")
    w.res.clear()
    assert w.log == [("drop", "A")] and "A" not in w.res
    assert w.res.snapshot()["tiers"][VRAM]["evictions"] == 1 and w.trims == 1
