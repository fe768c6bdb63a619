"""A method's own random draws follow the run's --seed (`dmuh.engine.builder.method_params_for`)."""

from dmuh.cli import main
from dmuh.runs.layout import load_checkpoint


def test_the_run_seed_is_the_method_seed_unless_given(tmp_path):
    """ITQ's rotation seed: the run's --seed, or -p seed= when given, recorded in the method spec."""
    seeds = {}
    for name, extra in {"s0": [], "s1": ["--seed", "1"], "s1-own0": ["--seed", "1", "-p", "seed=0"]}.items():
        out = tmp_path / name
        command = ["train", "--method", "itq", "--data", "digits", "--protocol", "digits", "--model", "smallcnn"]
        command += ["--model-param", "input_size=8", "--model-param", "width=8", "--bits", "8", "--quiet"]
        assert main(command + ["--out", str(out), *extra]) == 0
        seeds[name] = load_checkpoint(out / "checkpoint.safetensors")["method_spec"]["params"].get("seed")
    assert seeds == {"s0": 0, "s1": 1, "s1-own0": 0}
