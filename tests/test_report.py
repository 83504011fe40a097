"""The HTML report's pieces (the whole page is tested through the command line in test_cli_batch.py)."""

import numpy as np

from vaeguard.report import histogram_range


def test_far_out_rows_do_not_squeeze_the_score_histogram():
    rng = np.random.default_rng(0)
    bulk = -15 + rng.normal(size=3600)
    scores = np.concatenate([bulk, rng.uniform(-30000, -1000, size=100)])  # 2.7 % thousands of nats down
    offset = float(np.percentile(scores, 10))
    low = histogram_range(scores, offset)
    assert low < offset - 2 * (np.median(scores) - offset) and low > -200  # the threshold and bulk fill the axes
    assert histogram_range(bulk, float(np.percentile(bulk, 10))) == np.percentile(bulk, 0.5)  # no far-out rows
