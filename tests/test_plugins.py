"""A third-party policy registered through the `adaptive_loop.policies` entry-point group, used
from the library and from the command line."""

import json
import os
import subprocess
import sys

import pytest
import torch

from adaptive_loop import UsageError, generate, save_model
from adaptive_loop.policies import base, make

PLUGIN = '''
"""myplugin: halt once the relative change falls below a threshold (a plugin for tests)."""

from adaptive_loop.policies import HaltingPolicy


class HalfwayPolicy(HaltingPolicy):
    needs = frozenset({"delta"})

    def __init__(self, threshold=0.3, min_loops=1, max_loops=None, check_every=1):
        super().__init__(min_loops, max_loops, check_every)
        self.threshold = threshold

    def decide(self, signals):
        return signals.delta < self.threshold
'''


def distribution(root, name, entry_points, module=None, source=""):
    """A tiny installed distribution under `root`: its module (when given) and a
    `*.dist-info` whose entry points are `entry_points` ("name = module:Class" lines)."""
    root.mkdir(exist_ok=True)
    if module:
        (root / f"{module}.py").write_text(source)
    info = root / f"{name}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[adaptive_loop.policies]\n" + "".join(line + "\n" for line in entry_points))
    return root


def fresh_registry(monkeypatch, root):
    """Entry points read again (from `root` too), and forgotten after the test."""
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.setattr(base, "_ENTRY_POINTS_LOADED", False)
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))
    monkeypatch.setattr(base, "_BROKEN", {})


@pytest.fixture
def plugin_path(tmp_path):
    return distribution(tmp_path / "site", "myplugin",
                        ["myplugin = myplugin_policies:HalfwayPolicy"], "myplugin_policies",
                        PLUGIN)


def test_plugin_from_the_library(plugin_path, monkeypatch, tiny_model, prompts):
    fresh_registry(monkeypatch, plugin_path)
    assert "myplugin" in base.available()
    pol = make("myplugin", threshold=0.3, max_loops=6)
    assert type(pol).__name__ == "HalfwayPolicy" and pol.name == "myplugin"
    out = generate(tiny_model, prompts, policy=pol, gen_length=4, steps=4)
    ref = generate(tiny_model, prompts, policy=make("convergence", threshold=0.3, max_loops=6),
                   gen_length=4, steps=4)
    assert (out.tokens == ref.tokens).all() and (out.loops == ref.loops).all()
    assert out.loops.min() < out.loops.max()


def test_plugin_from_the_command_line(plugin_path, tmp_path, tiny_model):
    ck = save_model(tiny_model, tmp_path / "ck")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(plugin_path), *filter(None, [os.environ.get("PYTHONPATH")])])}
    res = subprocess.run([sys.executable, "-m", "adaptive_loop.cli", "generate", "--policy",
                          "myplugin", "--threshold", "0.3", "--checkpoint", str(ck),
                          "--gen-length", "4", "--device", "cpu", "--json", "abc"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr
    payload = json.loads(res.stdout)
    assert len(payload["text"]) == 1 and payload["stats"]["mean_loops"] < 4
    res = subprocess.run([sys.executable, "-m", "adaptive_loop.cli", "policies"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0 and "myplugin" in res.stdout


def test_broken_or_clashing_plugins_leave_the_built_in_policies_working(tmp_path, monkeypatch):
    """A plugin that does not import, is not a policy, declares an unknown signal or takes a
    built-in's name is not registered; asked for by name it gets one clear error, and every
    other policy works."""
    root = distribution(
        tmp_path / "site", "badplug",
        ["missing = no_such_module:Policy", "notapolicy = badplug:NotAPolicy",
         "magic = badplug:Magic", "entropy = badplug:Magic", "abstract = badplug:Abstract",
         "required = badplug:Required"], "badplug",
        "from adaptive_loop.policies import HaltingPolicy\n"
        "class NotAPolicy:\n    pass\n"
        "class Magic(HaltingPolicy):\n    needs = frozenset({'magic'})\n"
        "    def decide(self, signals):\n        return signals.needed\n"
        "class Abstract(HaltingPolicy):\n    needs = frozenset({'delta'})\n"
        "class Required(HaltingPolicy):\n    needs = frozenset({'delta'})\n"
        "    def __init__(self, threshold, min_loops=1, max_loops=None, check_every=1):\n"
        "        super().__init__(min_loops, max_loops, check_every)\n"
        "        self.threshold = threshold\n"
        "    def decide(self, signals):\n        return signals.delta < self.threshold\n")
    fresh_registry(monkeypatch, root)
    assert {"missing", "notapolicy", "magic"}.isdisjoint(base.available())
    assert type(make("entropy")).__module__ == "adaptive_loop.policies.entropy"
    broken = base.broken_plugins()
    assert "ModuleNotFoundError" in broken["missing"]
    assert "not a HaltingPolicy subclass" in broken["notapolicy"]
    assert "unknown signals ['magic']" in broken["magic"]
    assert "clashes with the built-in policy 'entropy'" in broken["entropy"]
    assert "abstract: does not define decide" in broken["abstract"]  # could never be built
    # a parameter without a default must be given: said in one line, not a TypeError
    with pytest.raises(UsageError, match="policy 'required' needs threshold"):
        make("required")
    assert make("required", threshold=0.5).threshold == 0.5
    with pytest.raises(UsageError, match="policy plugin 'missing': no_such_module:Policy "
                                         "failed to load"):
        make("missing")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root),
                                                        os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-m", "adaptive_loop.cli", "policies"], env=env,
                         capture_output=True, text=True)
    assert run.returncode == 0 and "entropy" in run.stdout
    assert "warning: policy plugin 'magic' not registered" in run.stderr


def test_a_plugin_is_registered_under_its_entry_points_name(tmp_path, monkeypatch):
    """A subclass of a built-in inherits its `name`, yet registers under its entry point's name
    and leaves the built-in in place; a class naming itself otherwise, or a second plugin
    taking a name, is refused; a plugin passing `**kwargs` on takes the common knobs."""
    root = distribution(
        tmp_path / "site", "subplug",
        ["tweaked = subplug:Tweaked", "named = subplug:Named", "passing = subplug:Passing"],
        "subplug",
        "from adaptive_loop.policies import HaltingPolicy\n"
        "from adaptive_loop.policies.entropy import Entropy\n"
        "class Tweaked(Entropy):\n    pass\n"
        "class Named(Entropy):\n    name = 'othername'\n"
        "class Also(Entropy):\n    pass\n"
        "class Passing(HaltingPolicy):\n    needs = frozenset({'delta'})\n"
        "    def __init__(self, threshold=0.3, **kwargs):\n"
        "        super().__init__(**kwargs)\n        self.threshold = threshold\n"
        "    def decide(self, signals):\n        return signals.delta < self.threshold\n")
    distribution(root, "zzplug", ["tweaked = subplug:Also"])  # another taking a plugin's name
    fresh_registry(monkeypatch, root)
    assert {"tweaked", "passing"} <= set(base.available())
    assert type(make("entropy")).__module__ == "adaptive_loop.policies.entropy"
    first = type(make("tweaked")).__name__  # the distributions' order is the file system's
    assert first in ("Tweaked", "Also") and make("tweaked").name == "tweaked"
    assert "othername" not in base.available()
    broken = base.broken_plugins()
    assert "names itself 'othername'" in broken["named"]
    assert "clashes with another plugin's policy 'tweaked'" in broken["tweaked"]
    pol = make("passing", threshold=0.2, min_loops=2, max_loops=5)
    assert (pol.min_loops, pol.max_loops, pol.threshold) == (2, 5, 0.2)
    assert repr(pol) == ("passing(threshold=0.2, min_loops=2, max_loops=5, check_every=1)")
    with pytest.raises(UsageError, match="takes no parameter bogus; it takes threshold, "
                                         "min_loops, max_loops, check_every"):
        make("passing", bogus=1)


def test_register_in_python_keeps_the_built_ins():
    """`register` refuses what could never work or would shadow a built-in policy, each with a
    UsageError; a class defined again under its own name replaces the earlier one."""
    from adaptive_loop.policies.entropy import Entropy

    class Inherits(Entropy):
        pass

    class Shadows(Entropy):
        name = "entropy"

    plain = type("Plain", (), {"name": "plain", "needs": frozenset()})
    class Colon(base.HaltingPolicy):
        name = "mine:v2"

        def decide(self, signals):
            return signals.index >= 0

    with pytest.raises(UsageError, match=r"unknown policy 'entropy:threshold=0.3': a policy's "
                       r"parameters are keywords, e.g. make\('entropy', threshold=0.3\)"):
        make("entropy:threshold=0.3")
    for cls, message in [(Inherits, "inherits the name 'entropy' from Entropy"),
                         (Colon, "a policy's name holds no ':', ',' or '='"),
                         (Shadows, "'entropy' is a built-in policy"),
                         (plain, "takes a HaltingPolicy subclass"),
                         (5, "takes a HaltingPolicy subclass")]:
        with pytest.raises(UsageError, match=message):
            base.register(cls)
    assert type(make("entropy")) is Entropy

    made = []
    for _ in range(2):  # the same cell run twice
        @base.register
        class Twice(base.HaltingPolicy):
            name = "twice-defined"

            def decide(self, signals):
                return signals.index >= 0

        made.append(Twice)
    assert type(make("twice-defined")) is made[1]

    class Other(base.HaltingPolicy):  # another class under the same name: refused
        name = "twice-defined"

        def decide(self, signals):
            return signals.index < 0

    with pytest.raises(UsageError, match="'twice-defined' is registered by .*Twice; register .*"
                                         "Other under another name"):
        base.register(Other)
    assert type(make("twice-defined")) is made[1]
    del base._REGISTRY["twice-defined"]


@pytest.mark.parametrize("needs", [("delta",), ["delta"], {"delta"}, frozenset({"delta"})])
def test_needs_may_be_any_collection_of_signals(needs, tiny_model, prompts):
    """`needs` declared as a tuple or list runs as a set does (the runtime once combined it
    with a set by `&`, which a tuple does not support)."""

    @base.register
    class Listed(base.HaltingPolicy):
        name = "listed-needs"

        def decide(self, signals):
            return signals.delta < 0.3

    Listed.needs = needs
    try:
        out = generate(tiny_model, prompts, policy=make("listed-needs"), gen_length=4, steps=2)
        same = generate(tiny_model, prompts, policy=make("convergence", threshold=0.3),
                        gen_length=4, steps=2)
        assert torch.equal(out.tokens, same.tokens) and torch.equal(out.loops, same.loops)
    finally:
        del base._REGISTRY["listed-needs"]


def test_a_subclass_of_a_built_in_policy_takes_its_parameters_through_kwargs():
    """A plugin that extends `entropy` and passes **kwargs on takes entropy's parameters, and
    its repr (a resumed run's identity) shows them."""
    from adaptive_loop.policies.entropy import Entropy

    @base.register
    class Scaled(Entropy):
        name = "scaled-entropy"

        def __init__(self, scale=1.0, **kwargs):
            super().__init__(**kwargs)
            self.scale = scale

    try:
        a, b = make("scaled-entropy", threshold=0.2, probe="lens"), make("scaled-entropy")
        assert (a.threshold, a.probe, a.scale) == (0.2, "lens", 1.0)
        assert repr(a) != repr(b) and "threshold=0.2" in repr(a)
        assert a.label() == "scaled-entropy(threshold=0.2, probe=lens)"
        with pytest.raises(UsageError, match="takes no parameter colour; it takes scale, "
                                             "threshold, context_threshold"):
            make("scaled-entropy", colour=1)
    finally:
        del base._REGISTRY["scaled-entropy"]


def test_a_signal_read_but_not_declared_is_named(tiny_model, prompts):
    @base.register
    class Undeclared(base.HaltingPolicy):
        name = "undeclared-delta"

        def decide(self, signals):
            return signals.delta < 0.3  # delta is not in needs: the runtime leaves it None

    try:
        with pytest.raises(UsageError, match=r"policy 'undeclared-delta': decide failed on a "
                           r"signal it did not declare .*add what it reads \(of delta, cosine, "
                           r"hidden, logits\) to its `needs`"):
            generate(tiny_model, prompts, policy=make("undeclared-delta"), gen_length=4,
                     steps=2)
    finally:
        del base._REGISTRY["undeclared-delta"]
