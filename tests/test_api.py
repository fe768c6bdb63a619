"""The public Python API: `import dmuh` is light, every name it lists resolves, and the README's
example runs as written."""

import re
import subprocess
import sys
from pathlib import Path

import dmuh

README = Path(__file__).resolve().parents[1] / "README.md"


def test_import_dmuh_loads_no_torch():
    probe = "import sys, dmuh; print('torch' in sys.modules, dmuh.__version__)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", dmuh.__version__]


def test_every_public_name_resolves():
    for name in dmuh.__all__:
        assert getattr(dmuh, name) is not None, name
    assert dmuh.available_methods() == sorted(dmuh.available_methods()) and "dmuh" in dmuh.available_methods()
    assert callable(dmuh.train) and dmuh.TrainConfig().method == "dmuh"


def test_an_unknown_name_is_an_attribute_error():
    try:
        dmuh.no_such_name  # noqa: B018
    except AttributeError as error:
        assert "no_such_name" in str(error)
    else:
        raise AssertionError("dmuh.no_such_name resolved")


def test_the_readme_example_runs(tmp_path):
    section = README.read_text().split("## Python API", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "MAP" in result.stdout and (tmp_path / "runs" / "api-example" / "eval.json").is_file()
