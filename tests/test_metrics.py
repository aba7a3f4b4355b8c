import numpy as np
import pytest

from sodm.metrics import (TABLE_RADII, average_certified_radius, certified_accuracy, format_table,
                          read_results, summary)

# Six images: two certified correct (radius 0.5 and 0.25 -- ties with table radii), one correct
# with a small radius, one wrong but "certified" (radius 0.9), one abstention, one correct at 1.0.
TSV = """idx\tlabel\tpredict\tradius\tcorrect\ttime
0\t3\t3\t0.5\t1\t0.100
20\t1\t1\t0.25\t1\t0.100
40\t2\t2\t0.1\t1\t0.100
60\t4\t7\t0.9\t0\t0.100
80\t5\t-1\t0.0\t0\t0.100
100\t6\t6\t1.0\t1\t0.100
"""


@pytest.fixture
def results(tmp_path):
    path = tmp_path / "r.tsv"
    path.write_text(TSV)
    return read_results(path)


def test_read(results):
    assert len(results) == 6
    assert results.idx.tolist() == [0, 20, 40, 60, 80, 100]
    assert results.predict[4] == -1
    assert results.correct.tolist() == [True, True, True, False, False, True]


def test_certified_accuracy_hand_values(results):
    acc = certified_accuracy(results.radius, results.correct, [0.0, 0.1, 0.25, 0.5, 0.75, 1.0, 1.25])
    # r=0: 4 correct of 6; r=0.1: the 0.1 tie counts; r=0.25: tie counts (>=); r=0.5: 0.5 and 1.0;
    # wrong predictions never count, whatever their radius.
    assert acc.tolist() == pytest.approx([4 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6, 1 / 6, 0.0])


def test_acr_hand_value(results):
    # (0.5 + 0.25 + 0.1 + 1.0) / 6; the wrong 0.9 and the abstention add 0.
    assert average_certified_radius(results.radius, results.correct) == pytest.approx(1.85 / 6)


def test_summary_and_table(results):
    s = summary(results)
    assert s["cert_acc_0.00"] == pytest.approx(4 / 6)
    assert s["cert_acc_2.50"] == 0.0
    assert s["abstain"] == pytest.approx(1 / 6)
    assert s["acr"] == pytest.approx(1.85 / 6)
    table = format_table({"m": results})
    assert table.splitlines()[1].split() == ["m"] + ["0.667", "0.500", "0.333", "0.167", "0.167"] \
        + ["0.000"] * 6 + ["0.308", "6"]
    assert len(TABLE_RADII) == 11 and TABLE_RADII[-1] == 2.5


def test_empty_and_arrays():
    assert average_certified_radius([], []) == 0.0
    assert certified_accuracy(np.array([]), np.array([]), [0.0]).tolist() == [0.0]
    assert average_certified_radius([0.3, 0.6], [1, 0]) == pytest.approx(0.15)


def test_not_a_results_file(tmp_path):
    bad = tmp_path / "x.tsv"
    bad.write_text("a\tb\n1\t2\n")
    with pytest.raises(ValueError, match="not a certification TSV"):
        read_results(bad)


def test_analyze_labels_runs_by_folder_when_files_share_a_name(tmp_path):
    from sodm.analyze import labels

    a, b = tmp_path / "run-a" / "certify.tsv", tmp_path / "run-b" / "certify.tsv"
    assert labels([a, b]) == ["run-a", "run-b"]
    assert labels([tmp_path / "x.tsv", tmp_path / "y.tsv"]) == ["x", "y"]
