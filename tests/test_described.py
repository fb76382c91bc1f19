"""The store of described images: what a scorer computes per image, kept between tasks, compares
exactly as the image described anew; a shard gives back the rows asked for, and refuses pickles."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from ensemble.described import from_blob, index_described, read_described, to_blob, write_described
from ensemble.keypoints import KEYPOINT_METHODS
from ensemble.verify import KeypointScorer
from tests.test_verify import rotated_crop, textured


@pytest.mark.parametrize("coarse_side", [0, 96])
@pytest.mark.parametrize("method", sorted(KEYPOINT_METHODS))
def test_packed_keypoints_compare_as_described_anew(method, coarse_side):
    scorer = KeypointScorer(method, coarse_side=coarse_side)
    ref, blank = textured(0), Image.new("RGB", (64, 64), (128, 128, 128))
    query = rotated_crop(ref).transpose(Image.Transpose.FLIP_LEFT_RIGHT)  # matches through the mirror view
    fresh = scorer.describe_query(query), [scorer.describe(ref), scorer.describe(textured(1)), scorer.describe(blank)]
    stored = (scorer.unpack(from_blob(to_blob(scorer.pack(fresh[0])))),
              [scorer.unpack(from_blob(to_blob(scorer.pack(c)))) for c in fresh[1]])
    assert isinstance(stored[0], list) and len(stored[0]) == 2 and stored[0][1].mirrored
    assert ("points1" in scorer.pack(fresh[0])) == (method == "orb")  # SIFT's mirror is a permutation: made again
    assert stored[1][2].descriptors is None and len(stored[1][2].points) == 0
    got = scorer.compare(*stored)
    assert got == scorer.compare(*fresh) and got[0][0] >= 20
    assert ("pointsc0" in scorer.pack(fresh[0])) == bool(coarse_side)
    levels = [(a, b) for a, b in zip(fresh[0] + fresh[1], stored[0] + stored[1])]
    levels += [(a.coarse, b.coarse) for a, b in levels if coarse_side]
    for a, b in levels:
        assert a.size == b.size and a.mirrored == b.mirrored and np.array_equal(a.points, b.points)
        for x, y in ((a.descriptors, b.descriptors), (a.codes, b.codes)):
            assert (x is None and y is None) or np.array_equal(x, y)


def test_a_shard_gives_back_the_rows_asked_for(tmp_path):
    rows = [(f"R{i:03d}", to_blob({"tokens": np.full((2, 3), i, np.float32)})) for i in range(30)]
    path = str(tmp_path / "reference-00000.parquet")
    assert write_described(reversed(rows), path) == 30
    index = index_described(str(tmp_path), "reference")
    assert index == {f"R{i:03d}": path for i in range(30)} and index_described(str(tmp_path), "query") == {}
    got = read_described({"R007": path, "R021": path})
    assert set(got) == {"R007", "R021"} and got["R021"]["tokens"][0, 0] == 21
    with pytest.raises(ValueError, match="missing from their shards: \\['R999'\\]"):
        read_described({"R999": path})


def test_a_blob_holding_a_pickle_is_refused():
    buf = io.BytesIO()
    np.savez(buf, evil=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match="allow_pickle"):
        from_blob(buf.getvalue())
