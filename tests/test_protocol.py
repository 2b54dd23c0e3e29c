"""`hpcrl.comm.protocol`: the wire schemas (numpy only, no MPI)."""

from __future__ import annotations

import numpy as np
import pytest

from hpcrl.comm.protocol import Schema, q_table_schema, tabular_experience_schema


def byte_ranges(schema: Schema):
    for name, (offset, shape, dtype) in schema.fields.items():
        yield name, offset, offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize


def fill_pattern(view: np.ndarray, index: int) -> np.ndarray:
    """Values unique to field `index` (bools: a phase-shifted stripe)."""
    if view.dtype == np.bool_:
        return (np.arange(view.size) + index) % 3 == 0
    return (np.arange(view.size) + 1000 * (index + 1)).astype(view.dtype)


SCHEMAS = {
    "experience-5": tabular_experience_schema(5),
    "experience-1": tabular_experience_schema(1),
    "q-table-3x5": q_table_schema(3, 5),
    "odd": Schema(
        [
            ("flags", (3,), np.bool_),
            ("small", (5,), np.int8),
            ("f32", (3,), np.float32),
            ("scalar", (), np.int64),
            ("grid", (2, 3), np.int16),
            ("empty", (0,), np.float64),
            ("tail", (7,), np.uint8),
        ]
    ),
}


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_schema_fields_are_aligned_and_disjoint(name):
    schema = SCHEMAS[name]
    ranges = sorted((start, end, field) for field, start, end in byte_ranges(schema))
    for start, _, field in ranges:
        assert start % 8 == 0, field
    for (_, end, field), (start, _, other) in zip(ranges, ranges[1:], strict=False):
        assert end <= start, (field, other)
    assert ranges[-1][1] <= schema.nbytes
    assert schema.nbytes % 8 == 0


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_message_views_do_not_overlap(name):
    schema = SCHEMAS[name]
    msg = schema.allocate()
    assert msg.buffer.nbytes == schema.nbytes
    patterns = {}
    for index, field in enumerate(schema.fields):
        view = msg[field]
        offset, shape, dtype = schema.fields[field]
        assert view.shape == shape and view.dtype == dtype
        assert view.ctypes.data % 8 == 0
        patterns[field] = fill_pattern(view, index).reshape(shape)
        view[...] = patterns[field]
    for field, pattern in patterns.items():
        np.testing.assert_array_equal(msg[field], pattern, err_msg=field)


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_message_views_share_the_buffer(name):
    schema = SCHEMAS[name]
    sent = schema.allocate()
    for index, field in enumerate(schema.fields):
        sent[field][...] = fill_pattern(sent[field], index).reshape(sent[field].shape)
        if sent[field].size:
            assert np.shares_memory(sent[field], sent.buffer)
    received = schema.allocate()
    received.buffer[:] = sent.buffer  # what a buffer Recv does
    for field in schema.fields:
        np.testing.assert_array_equal(received[field], sent[field], err_msg=field)
    received.buffer[:] = 0
    for field in schema.fields:
        assert not received[field].any(), field


def test_schema_docstring_size():
    schema = Schema([("header", (4,), np.int64), ("q", (3, 2), np.float64)])
    assert schema.nbytes == 80
    assert schema.fields["q"][0] == 32
