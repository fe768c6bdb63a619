"""Readers bounded against amplification (issue 31, class 1): YAML alias bombs and nesting, JSON
nesting, .npy/.npz members that would inflate far beyond the file, flags that imply memory."""

import io
import json
import zipfile

import numpy as np
import pytest

from dmuh.errors import ConfigError, DmuhError
from dmuh.utils.io import check_array_file, parse_json
from dmuh.utils.schema import load_yaml, parse_params

BOMB = "\n".join(
    ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    + [f"{c}: &{c} [{', '.join(['*' + p] * 9)}]" for p, c in zip("abcdefgh", "bcdefghi")]
)


def test_a_yaml_alias_bomb_is_refused_before_it_is_expanded(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB)
    assert len(BOMB) < 600
    with pytest.raises(ConfigError, match="expands to more than 100,000 values"):
        load_yaml(path)


def test_a_few_aliases_still_work(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text("model_params: &m {width: 8}\nprotocol_params: {query_per_class: 5}\nextra: *m\n")
    assert load_yaml(path)["extra"] == {"width": 8}


@pytest.mark.parametrize("depth", [40, 5000])
def test_deeply_nested_yaml_is_refused(tmp_path, depth):
    path = tmp_path / "deep.yaml"
    path.write_text("a: " + "[" * depth + "]" * depth + "\n")
    with pytest.raises(ConfigError, match="nested deeper than 32 levels"):
        load_yaml(path)


def test_a_config_file_larger_than_a_config_is_refused(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text("epochs: 1\n# " + "x" * (1 << 20) + "\n")
    with pytest.raises(ConfigError, match="more than a config file"):
        load_yaml(path)


def test_a_bomb_in_a_flag_value_is_refused_naming_the_flag():
    flow = "[&a [x,x,x,x,x,x,x,x,x,x], &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a], &c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b], " \
        "&d [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c], &e [*d,*d,*d,*d,*d,*d,*d,*d,*d,*d]]"  # fmt: skip
    with pytest.raises(ConfigError, match="--param alpha: value .*expands to more than"):
        parse_params([f"alpha={flow}"], "--param")


@pytest.mark.parametrize("depth", [65, 100_000])
def test_deeply_nested_json_is_a_value_error(depth):
    with pytest.raises(ValueError, match="nested deeper than 64 levels"):
        parse_json("[" * depth + "]" * depth)
    assert parse_json(json.dumps({"a": [[1]]})) == {"a": [[1]]}


def test_a_json_integer_of_thousands_of_digits_is_a_value_error():
    with pytest.raises(ValueError):
        parse_json("[" + "9" * 5000 + "]")


def zip_bomb(path, name="codes.npy", inflated=80 << 20):
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False, "shape": (inflated,)})
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        with archive.open(name, "w", force_zip64=True) as member:
            member.write(header.getvalue())
            block = bytes(1 << 20)
            for _ in range(inflated >> 20):
                member.write(block)


def test_an_npz_member_that_inflates_hundreds_of_times_is_refused_before_reading(tmp_path):
    path = tmp_path / "bomb.npz"
    zip_bomb(path)
    assert path.stat().st_size < 1 << 20
    with pytest.raises(DmuhError, match="inflates .* times .*a zip bomb"):
        check_array_file(path, "codes file")


def test_an_npy_header_declaring_more_than_the_file_holds_is_refused(tmp_path):
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (10**12, 64)})
    path = tmp_path / "huge.npy"
    path.write_bytes(header.getvalue() + bytes(64))
    with pytest.raises(DmuhError, match="declares .* bytes of data, the file holds fewer"):
        check_array_file(path, "features")
    member = tmp_path / "huge.npz"
    with zipfile.ZipFile(member, "w") as archive:
        archive.writestr("features.npy", header.getvalue() + bytes(64))
    with pytest.raises(DmuhError, match="cannot read key 'features' .its header declares"):
        check_array_file(member, "features")


def test_object_arrays_are_refused_and_real_arrays_pass(tmp_path):
    np.savez(tmp_path / "ok.npz", features=np.ones((10, 4), np.float32), labels=np.arange(10))
    check_array_file(tmp_path / "ok.npz", "features")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DmuhError, match="Python objects"):
        check_array_file(tmp_path / "obj.npy", "features")


def test_index_parameters_past_their_limits_are_refused():
    from dmuh.retrieval.index.base import SearchParams, resolve_params
    from dmuh.retrieval.options import KIND_PARAMS

    with pytest.raises(DmuhError, match="index parameter m=100000000: expected at most 256"):
        resolve_params("hnsw", KIND_PARAMS, {"m": 100_000_000}, 1000)
    with pytest.raises(DmuhError, match="nprobe=4294967296: expected at most"):
        SearchParams(nprobe=4294967296)
    with pytest.raises(DmuhError, match="ef_search=4294967296: expected at most"):
        SearchParams(ef_search=2**32)


def test_an_image_size_that_would_not_fit_in_memory_is_refused():
    from dmuh.retrieval.encoder import check_decode_memory

    check_decode_memory(32, 4096, 3)
    with pytest.raises(DmuhError, match="image size 4096: decoding 4,096 images .* GiB"):
        check_decode_memory(4096, 4096, 3)
