"""The l1 sweep's summary (benchmarks/l1_layers.py): each JSAE row against the l1 = 0 pair trained
the same way, and only the default settings in the documentation's table."""

import importlib.util
import json
import os

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "l1_layers.py")


@pytest.fixture(scope="module")
def l1_layers():
    spec = importlib.util.spec_from_file_location("l1_layers", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(l1, norm, fvu_in, fvu_out, split="shuffled", params=None, max_iter=30, layer=2):
    return {"model": "minilm", "layer": layer, "tokens": 10_000, "l1": l1, "split": split,
            "params": params or {}, "max_iter": max_iter, "scale_ratio": 0.5,
            "absolute": {"0.01": norm / 2}, "normalized": {"0.01": norm},
            "fvu_input": fvu_in, "fvu_output": fvu_out}


def _summarise(l1_layers, tmp_path, rows, l1_default=2.0):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps({"rows": rows}))
    rst = tmp_path / "table.txt"
    l1_layers.main(["--summarise", str(path), "--l1-default", str(l1_default), "--rst", str(rst)])
    return [line for line in rst.read_text().splitlines() if line.startswith("MiniLM")]


def test_each_row_is_compared_with_the_pair_trained_the_same_way(l1_layers, tmp_path, capsys):
    rows = [
        _row(0.0, 0.90, 0.20, 0.30),
        _row(2.0, 0.30, 0.25, 0.34),
        # an experiment with its own baseline: it must not borrow the default pair's
        _row(0.0, 0.80, 0.10, 0.10, params={"learning_rate": 2e-3}),
        _row(2.0, 0.40, 0.30, 0.30, params={"learning_rate": 2e-3}),
        # the file-order split is another experiment
        _row(0.0, 0.95, 0.50, 0.50, split="file-order"),
        _row(2.0, 0.19, 0.51, 0.52, split="file-order"),
    ]
    table = _summarise(l1_layers, tmp_path, rows)
    assert len(table) == 1, table
    assert "3.0x" in table[0] and "+0.050" in table[0] and "+0.040" in table[0]
    printed = capsys.readouterr().out
    assert "2.0x" in printed  # the learning-rate experiment, 0.80 / 0.40, against its own pair
    assert "5.0x" in printed  # the file-order one, 0.95 / 0.19


def test_the_l1_ramp_shares_the_pair_without_a_penalty(l1_layers, tmp_path, capsys):
    # l1 = 0 has no penalty to ramp, so a ramp experiment compares with the default pair
    rows = [_row(0.0, 0.90, 0.20, 0.30), _row(2.0, 0.45, 0.22, 0.31, params={"l1_warmup": 0.5})]
    assert _summarise(l1_layers, tmp_path, rows) == []  # not a default row: not in the table
    assert "2.0x" in capsys.readouterr().out


def test_the_penalty_form_shares_the_pair_and_is_printed_by_name(l1_layers, tmp_path, capsys):
    # l1 = 0 computes no penalty, so a penalty="unit_gain" row compares with the default pair
    rows = [_row(0.0, 0.90, 0.20, 0.30), _row(2.0, 0.60, 0.26, 0.37, params={"penalty": "unit_gain"})]
    assert _summarise(l1_layers, tmp_path, rows) == []
    line = [row for row in capsys.readouterr().out.splitlines() if "penalty=unit_gain" in row]
    assert len(line) == 1 and "1.5x" in line[0] and "+0.060" in line[0] and "+0.070" in line[0]


def test_the_table_keeps_the_common_budget(l1_layers, tmp_path):
    rows = [_row(0.0, 0.90, 0.2, 0.3), _row(2.0, 0.30, 0.2, 0.3),
            _row(0.0, 0.90, 0.2, 0.3, layer=3), _row(2.0, 0.30, 0.2, 0.3, layer=3),
            _row(0.0, 0.92, 0.2, 0.3, max_iter=90), _row(2.0, 0.20, 0.2, 0.3, max_iter=90)]
    table = _summarise(l1_layers, tmp_path, rows)
    assert [line.split()[1] for line in table] == ["2", "3"]


def test_parameters_parse_to_the_estimator_types(l1_layers):
    assert l1_layers._parse_params(["max_iter=10", "learning_rate=2e-3", "batch_size=256", "aux_coef=0.5"]) == {
        "max_iter": 10, "learning_rate": 2e-3, "batch_size": 256, "aux_coef": 0.5}
    assert isinstance(l1_layers._parse_params(["max_iter=10"])["max_iter"], int)
    assert l1_layers._parse_params(["device=cuda", "mixed_precision=auto"]) == {"device": "cuda",
                                                                                "mixed_precision": "auto"}


def test_unit_gain_divides_each_entry_by_its_output_row_norm(l1_layers):
    import numpy as np
    import scipy.sparse as sp

    # one sample, output latents 0 and 1 by input latent 0: normalised entries 0.008 and 0.004
    J = sp.coo_array((np.array([0.016, 0.008]), (np.array([0, 0]), np.array([0, 1]), np.array([0, 0]))),
                     shape=(1, 2, 1))
    absolute, normalized, unit_gain = l1_layers._fractions(J, 0.5, gains=np.array([2.0, 0.2]))
    assert absolute["0.01"] == 0.5        # 0.016 only
    assert normalized["0.01"] == 0.0      # 0.008, 0.004
    assert unit_gain["0.01"] == 0.5       # 0.004, 0.02: the quiet latent's entry is large per unit gain
    assert unit_gain["0.005"] == 0.5 and unit_gain["0.02"] == 0.0


def test_the_unit_gain_ratio_is_printed_where_both_rows_have_it(l1_layers, tmp_path, capsys):
    with_gain = [dict(_row(0.0, 0.90, 0.2, 0.3), unit_gain={"0.01": 0.9}, output_gain_median=1.4),
                 dict(_row(2.0, 0.30, 0.2, 0.3), unit_gain={"0.01": 0.6}, output_gain_median=0.5)]
    _summarise(l1_layers, tmp_path, with_gain)
    printed = capsys.readouterr().out.splitlines()[-2]
    assert "3.0x" in printed and "1.5x" in printed and "1.40 → 0.50" in printed
    _summarise(l1_layers, tmp_path, [_row(0.0, 0.90, 0.2, 0.3), _row(2.0, 0.30, 0.2, 0.3)])
    assert capsys.readouterr().out.splitlines()[-2].endswith("| - | -")  # older rows: no unit-gain view
