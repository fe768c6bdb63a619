"""The package's structure and contracts: no import cycles, methods rebuilt from a checkpoint
without labels, one registry rule for fixed options."""

import ast
from pathlib import Path

import pytest
import torch

from dmuh.cli import main
from dmuh.engine.builder import encode, load_run
from dmuh.engine.runtime import Execution
from dmuh.engine.trainer import train
from dmuh.errors import DmuhError
from dmuh.methods import available, create_method, display_name
from dmuh.models import create_model
from dmuh.runs.config import TrainConfig
from dmuh.runs.layout import CHECKPOINT, LEGACY_CHECKPOINT, load_checkpoint, load_run_config, rebuild_networks

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "dmuh"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict:
    """{module: modules of dmuh it imports}, every import statement (function-local ones too)."""
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package, up level - 1
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                targets.add(base)
                targets.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def cycles(graph: dict) -> list:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert (
        "dmuh.engine.trainer" in graph and "dmuh.runs.layout" in graph["dmuh.engine.trainer"]
    )  # the reader sees the imports
    assert cycles(graph) == []


# The layers, lowest first: a module may import its own layer and those below it, never above.
LAYERS = (
    "dmuh.errors",
    "dmuh.utils",
    "dmuh.codes",
    "dmuh.metrics",
    "dmuh.data",
    "dmuh.models",
    "dmuh.methods",
    "dmuh.runs",
    "dmuh.engine",
    "dmuh.retrieval",
    "dmuh.serve",
    "dmuh.studies",
    "dmuh.cli",
    "dmuh",
)


def layer(module: str) -> int:
    """The index in LAYERS of the deepest layer that holds `module` (`dmuh` itself: the public API, on top)."""
    held = [i for i, name in enumerate(LAYERS[:-1]) if module == name or module.startswith(name + ".")]
    return max(held, default=len(LAYERS) - 1)


def upward_imports(graph: dict) -> list:
    return sorted(
        (source, target) for source, targets in graph.items() for target in targets if layer(target) > layer(source)
    )


def test_every_module_belongs_to_a_layer_and_imports_point_down():
    graph = import_graph()
    outside = [module for module in graph if layer(module) == len(LAYERS) - 1]
    assert sorted(outside) == ["dmuh", "dmuh.__main__"]
    assert upward_imports(graph) == []


def test_an_upward_import_is_found():
    graph = {"dmuh.codes.binary": {"dmuh.utils.io", "dmuh.engine.trainer"}, "dmuh.cli": {"dmuh.engine.trainer"}}
    assert upward_imports(graph) == [("dmuh.codes.binary", "dmuh.engine.trainer")]
    assert layer("dmuh.methods.components.memory") == LAYERS.index("dmuh.methods")
    assert layer("dmuh") == len(LAYERS) - 1 and layer("dmuh.errors") == 0


def method_file_imports(graph: dict) -> list:
    """(importer, imported) where a file of dmuh.methods imports a method file: within the layer a
    method file may import only `dmuh.methods.base` and `dmuh.methods.components.*` (shared math)."""

    def shared(module: str) -> bool:
        return module == "dmuh.methods.base" or module.startswith("dmuh.methods.components")

    return sorted(
        (source, target)
        for source, targets in graph.items()
        if source.startswith("dmuh.methods.")
        for target in targets
        if (target == "dmuh.methods" or target.startswith("dmuh.methods.")) and not shared(target)
    )


def test_no_method_file_imports_another():
    assert method_file_imports(import_graph()) == []
    graph = {
        "dmuh.methods.ugach": {"dmuh.methods.distillhash", "dmuh.methods.components.reference"},
        "dmuh.methods.components.memory": {"dmuh.methods.base", "dmuh.methods"},
        "dmuh.methods": {"dmuh.methods.dmuh"},
    }
    assert method_file_imports(graph) == [
        ("dmuh.methods.components.memory", "dmuh.methods"),
        ("dmuh.methods.ugach", "dmuh.methods.distillhash"),
    ]


def function_local_imports(path: Path) -> list:
    """`dmuh` imports inside functions of one file, as (line, module)."""
    found = []
    for function in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(function):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dmuh"):
                    found.append((node.lineno, node.module))
                elif isinstance(node, ast.Import):
                    found.extend((node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "dmuh")
    return found


# The modules that load torch, deferred where a command that runs no network (`dmuh index build`,
# `dmuh search` of codes) would otherwise import it; each one named here, so the list grows only on purpose.
TORCH_DEFERRED = {
    "retrieval/index/base.py": {"dmuh.models.decoder"},  # an index that holds a decoder
    "retrieval/indexing.py": {"dmuh.methods", "dmuh.retrieval.encoder"},  # codes whose run trained a decoder
    "retrieval/service.py": {"dmuh.retrieval.encoder", "dmuh.data.pipeline"},  # queries that are images
}


def test_dmuh_is_imported_at_module_level():
    """Except by the CLI, which defers the library so that `--help` answers without loading torch,
    for the Milvus backend, an optional dependency, and the torch modules of TORCH_DEFERRED."""
    optional = {"dmuh.retrieval.index.milvus"}
    local = {
        name: [
            (line, module)
            for line, module in function_local_imports(path)
            if module not in optional and module not in TORCH_DEFERRED.get(name, ())
        ]
        for path in PACKAGE.rglob("*.py")
        if "cli" not in path.relative_to(PACKAGE).parts[:1]
        for name in [path.relative_to(PACKAGE).as_posix()]
    }
    assert {name: found for name, found in local.items() if found} == {}
    deferred = {
        name: {module for _, module in function_local_imports(PACKAGE / name)} - optional for name in TORCH_DEFERRED
    }
    assert deferred == TORCH_DEFERRED  # no stale entry


def test_commands_that_run_no_network_do_not_import_torch(tmp_path):
    """`dmuh index build` and `dmuh search` of a codes file spend their time on the work: a fresh
    process builds an index of codes and searches it without importing torch."""
    import subprocess
    import sys

    import numpy as np

    from dmuh.codes.file import Codes

    rng = np.random.default_rng(0)
    for name, n in (("db", 200), ("q", 5)):
        packed = np.packbits(rng.integers(0, 2, (n, 64)).astype(bool), axis=1)
        Codes(packed=packed, bits=64, ids=[f"{name}/{i}.png" for i in range(n)]).save(tmp_path / f"{name}.npz")
    script = (
        "import sys; from dmuh.cli import main\n"
        "assert main(['index', 'build', '--codes', 'db.npz', '--out', 'db.idx']) == 0\n"
        "assert main(['search', '--index', 'db.idx', '--queries', 'q.npz', '--k', '3', '--json']) == 0\n"
        "print('torch loaded:', 'torch' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("torch loaded: False")


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_only_the_loop_and_compare_import_the_loop():
    importers = sorted(name for name, targets in import_graph().items() if "dmuh.engine.trainer" in targets)
    assert importers == ["dmuh.cli.training", "dmuh.studies.compare"]


# --- the method contract ------------------------------------------------------------------------


def test_overriding_a_fixed_variant_option_is_refused():
    labels = torch.eye(2)
    with pytest.raises(DmuhError, match=r"method 'dmuh-wo-u' fixes uncertainty_term=False; it cannot be changed"):
        create_method("dmuh-wo-u", bits=4, train_labels=labels, uncertainty_term=True)
    with pytest.raises(DmuhError, match=r"model 'resnet18-32' fixes small_input=True"):
        create_model("resnet18-32", bits=4, small_input=False)


def test_a_fixed_option_given_on_the_command_line_is_an_error(tmp_path, capsys):
    code = main(
        [
            "train",
            "--data",
            "digits",
            "--protocol",
            "digits",
            "--model",
            "smallcnn",
            "--model-param",
            "input_size=8",
            "--method",
            "dmuh-wo-u",
            "-p",
            "uncertainty_term=true",
            "--epochs",
            "1",
            "--out",
            str(tmp_path / "run"),
            "--quiet",
        ]
    )
    assert code == 2
    assert "fixes uncertainty_term=False" in capsys.readouterr().err


def test_a_method_is_built_from_its_size_and_labels_are_handed_over():
    method = create_method("regu", bits=3, num_train=5, num_classes=2)
    assert method.memory.labels.shape == (5, 2) and not method.memory.labels.any()
    labels = torch.eye(2)[[0, 1, 1, 0, 1]]
    method.set_train_labels(labels)
    assert torch.equal(method.memory.labels, labels)
    with pytest.raises(DmuhError, match=r"training labels of shape \(4, 2\)"):
        method.set_train_labels(labels[:4])
    assert method.spec() == {"name": "regu", "bits": 3, "num_train": 5, "num_classes": 2, "params": {}}


def test_the_base_class_declares_what_the_loop_reads():
    for name in available():
        method = create_method(name, bits=8, num_train=4, num_classes=2)
        assert isinstance(method.notes, list) and isinstance(method.step_stats, dict)
        needs = method.requirements()
        assert needs.uses_momentum == (needs.momentum is not None)
    assert create_method("dmuh", bits=8, num_train=4, num_classes=2, alpha=0.9).requirements().momentum == 0.9
    assert create_method("regu", bits=8, num_train=4, num_classes=2).requirements().momentum is None
    assert display_name("dmuh") == "DMUH" and display_name("dmuh-wo-u") == "dmuh-wo-u"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("structure") / "run"
    config = TrainConfig(
        data="digits",
        protocol="digits",
        model="smallcnn",
        model_params={"input_size": 8},
        method="dmuh",
        bits=12,
        epochs=1,
        batch_size=64,
        out=str(out),
    )
    train(config, progress=False, echo=lambda line: None)
    return out


def test_a_checkpoint_rebuilds_network_and_method_without_labels(tiny_run):
    checkpoint = load_checkpoint(tiny_run / CHECKPOINT)
    assert checkpoint["model_config"]["name"] == "smallcnn" and checkpoint["method_spec"]["num_train"] == 1000
    exp = load_run(tiny_run)
    inputs = exp.images[:50]
    expected = encode(exp.model, exp.method, inputs, exp.pipeline, exp.execution)
    config = load_run_config(tiny_run)
    model, method, momentum = rebuild_networks(checkpoint, tiny_run / CHECKPOINT, tiny_run, config)
    assert momentum is not None and method.requirements().momentum == exp.requirements.momentum
    torch.testing.assert_close(
        encode(model, method, inputs, exp.pipeline, Execution.of(config, exp.device)), expected, rtol=0, atol=0
    )
    assert torch.equal(method.memory.labels, exp.method.memory.labels)  # state, not a stand-in


def legacy_run(run, tmp_path, checkpoint: dict):
    """A copy of `run` as dmuh wrote it before checkpoint.safetensors: `checkpoint` as a pickled
    checkpoint.pt, converted by `dmuh convert-checkpoint` as a user does."""
    import shutil

    copy = tmp_path / "legacy"
    shutil.copytree(run, copy)
    (copy / CHECKPOINT).unlink()
    torch.save(checkpoint, copy / LEGACY_CHECKPOINT)
    with pytest.raises(DmuhError, match="old-format checkpoint .*dmuh convert-checkpoint --run"):
        load_checkpoint(copy / CHECKPOINT)
    assert main(["convert-checkpoint", "--run", str(copy)]) == 0
    assert (copy / LEGACY_CHECKPOINT).is_file()  # kept
    return copy


def test_a_checkpoint_of_the_first_layout_still_loads(tiny_run, tmp_path):
    """Before the specs were recorded and the memory was a component: rebuilt from config and shapes."""
    checkpoint = load_checkpoint(tiny_run / CHECKPOINT)
    exp = load_run(tiny_run)
    inputs = exp.images[:50]
    expected = encode(exp.model, exp.method, inputs, exp.pipeline, exp.execution)
    old = {key: value for key, value in checkpoint.items() if key not in ("model_config", "method_spec")}
    renamed = {
        "memory.codes": "memory",
        "memory.labels": "memory_labels",
        "memory.seen": "seen",
        "memory.uncertainty": "memory_uncertainty",
    }
    old["method"] = {renamed.get(key, key): value for key, value in checkpoint["method"].items()}
    run = legacy_run(tiny_run, tmp_path, old)
    converted = load_checkpoint(run / CHECKPOINT)
    assert "model_config" not in converted and list(converted["model"]) == list(old["model"])
    config = load_run_config(run)
    model, method, _ = rebuild_networks(converted, run / CHECKPOINT, run, config)
    torch.testing.assert_close(
        encode(model, method, inputs, exp.pipeline, Execution.of(config, exp.device)), expected, rtol=0, atol=0
    )
    assert method.num_train == 1000 and method.num_classes == 10
    # Trained before the default reading changed: rebuilt with the reading it was trained with.
    assert method.requirements().momentum_dropout == "off"
    assert create_method("dmuh", bits=12, num_train=2, num_classes=2).requirements().momentum_dropout == "own"


def test_resuming_a_checkpoint_of_the_first_layout_keeps_its_reading(tmp_path):
    out = tmp_path / "run"
    config = TrainConfig(
        data="digits",
        protocol="digits",
        model="smallcnn",
        model_params={"input_size": 8},
        method="dmuh",
        bits=8,
        epochs=1,
        batch_size=64,
        out=str(out),
    )
    train(config, progress=False, echo=lambda line: None)
    checkpoint = load_checkpoint(out / CHECKPOINT)
    del checkpoint["method_spec"], checkpoint["model_config"]
    out = legacy_run(out, tmp_path, checkpoint)
    from dmuh.engine.trainer import Trainer

    trainer = Trainer(
        TrainConfig(**{**config.to_dict(), "epochs": 2, "out": str(out)}),
        resume=True,
        progress=False,
        echo=lambda line: None,
    )
    assert trainer.exp.requirements.momentum_dropout == "off" and trainer.exp.momentum.dropout == "off"


# --- the command line ---------------------------------------------------------------------------


def test_run_flag_everywhere_and_the_old_spellings_with_a_notice(tiny_run, tmp_path, capsys):
    assert main(["evaluate", "--run", str(tiny_run), "--json", str(tmp_path / "a.json")]) == 0
    captured = capsys.readouterr()
    assert "deprecated" not in captured.err and "MAP@all (ties expected)" in captured.out
    assert main(["evaluate", str(tiny_run), "--json", str(tmp_path / "c.json")]) == 0
    assert capsys.readouterr().err.strip() == f"dmuh: note: a bare RUN argument is deprecated; use --run {tiny_run}"
    assert main(["encode", "--checkpoint", str(tiny_run), "--images", "digits", "--out", str(tmp_path / "c.npz")]) == 0
    assert capsys.readouterr().err.strip() == f"dmuh: note: --checkpoint is deprecated; use --run {tiny_run}"
    assert main(["evaluate"]) == 2
    assert "--run RUN is required" in capsys.readouterr().err


def test_ties_choices_come_from_the_library():
    from dmuh.cli import build_parser
    from dmuh.metrics.ranking import TIES

    with pytest.raises(SystemExit):
        build_parser().parse_args(["evaluate", "--run", "x", "--ties", "random"])
    for mode in TIES:
        assert build_parser().parse_args(["evaluate", "--run", "x", "--ties", mode]).ties == mode


def test_files_written_atomically_get_the_usual_mode(tmp_path):
    import os

    from dmuh.utils.io import atomic_write_text

    atomic_write_text(tmp_path / "a.txt", "x")
    (tmp_path / "b.txt").write_text("x")
    assert os.stat(tmp_path / "a.txt").st_mode & 0o777 == os.stat(tmp_path / "b.txt").st_mode & 0o777
