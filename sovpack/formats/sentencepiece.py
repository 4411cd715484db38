"""SentencePiece `tokenizer.model` files, checked as what they are: a protobuf ModelProto.

The `sentencepiece` package is not a dependency, and protobuf's own parser would need the
schema compiled in; the wire format is small, so it is walked here with every length
bounded by the bytes left. What is required (sentencepiece_model.proto):

    ModelProto: 1 pieces (repeated SentencePiece), 2 trainer_spec, 3 normalizer_spec,
                4 self_test_data, 5 denormalizer_spec - all length-delimited messages;
                extensions (field numbers from 200) are skipped
    SentencePiece: 1 piece (string), 2 score (float), 3 type (enum)

The whole file must be consumed by whole fields, with at least one piece. Nested messages
other than the pieces are bounded in length but not interpreted further.
"""

from __future__ import annotations

from sovpack.errors import FormatError

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5
_MODEL_FIELDS = {1: "pieces", 2: "trainer_spec", 3: "normalizer_spec", 4: "self_test_data", 5: "denormalizer_spec"}
_FIRST_EXTENSION = 200
_PIECE_FIELDS = {1: _LEN, 2: _I32, 3: _VARINT}


class _Malformed(ValueError):
    pass


def _varint(data, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while pos < end and shift < 64:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
    raise _Malformed(f"a varint at byte {pos} runs past its field or beyond 64 bits")


def _fields(data, pos: int, end: int):
    """(field number, wire type, start, stop) of each field in data[pos:end]; stop is where the value ends."""
    while pos < end:
        key, pos = _varint(data, pos, end)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise _Malformed(f"field number 0 at byte {pos}")
        if wire == _VARINT:
            _, stop = _varint(data, pos, end)
        elif wire == _LEN:
            length, pos = _varint(data, pos, end)
            stop = pos + length
        elif wire in (_I64, _I32):
            stop = pos + (8 if wire == _I64 else 4)
        else:
            raise _Malformed(f"field {number} at byte {pos} has wire type {wire}, which protobuf no longer uses")
        if stop > end:
            raise _Malformed(f"field {number} at byte {pos} runs past the end of its message")
        yield number, wire, pos, stop
        pos = stop


def _check_piece(data, pos: int, end: int) -> None:
    """A SentencePiece message: fields 1 (bytes), 2 (fixed32) and 3 (varint) as declared; unknown ones walked.

    Written as one loop, not with `_fields`: a vocabulary has up to 256k pieces, checked on every verify.
    """
    while pos < end:
        key = data[pos]
        if key == 0x0A:  # 1: piece, length-delimited (pieces are short: a one-byte length)
            length = data[pos + 1] if pos + 1 < end else 0x80
            if length & 0x80:
                length, start = _varint(data, pos + 1, end)
            else:
                start = pos + 2
            pos = start + length
        elif key == 0x15:  # 2: score, fixed32
            pos += 5
        elif key == 0x18:  # 3: type, varint
            _, pos = _varint(data, pos + 1, end)
        else:
            for number, wire, value_start, value_stop in _fields(data, pos, end):
                if _PIECE_FIELDS.get(number, wire) != wire:
                    raise _Malformed(f"a piece's field {number} at byte {value_start} has wire type {wire}")
                pos = value_stop
                break
    if pos != end:
        raise _Malformed(f"a piece's field runs past the end of its message at byte {end}")


def read_model_proto(data) -> int:
    """Walk a ModelProto; the number of pieces. Raises ValueError when the bytes are not one."""
    pieces, pos, end = 0, 0, len(data)
    while pos < end:
        if data[pos] == 0x0A and pos + 1 < end and not data[pos + 1] & 0x80:  # a piece of fewer than 128 bytes
            start, stop = pos + 2, pos + 2 + data[pos + 1]
            if stop > end:
                raise _Malformed(f"the piece at byte {pos} runs past the end")
            _check_piece(data, start, stop)
            pieces += 1
            pos = stop
            continue
        number, wire, start, stop = next(_fields(data, pos, end))
        if number == 1 and wire == _LEN:
            _check_piece(data, start, stop)
            pieces += 1
        elif number < _FIRST_EXTENSION and (number not in _MODEL_FIELDS or wire != _LEN):
            raise _Malformed(f"field {number} (wire type {wire}) at byte {pos} is not part of a SentencePiece model")
        pos = stop
    if not pieces:
        raise _Malformed("it holds no pieces")
    return pieces


def inspect_sentencepiece(data, name: str) -> dict:
    """What a SentencePiece model holds; a FormatError naming `name` when it is malformed."""
    try:
        return {"pieces": read_model_proto(data)}
    except _Malformed as e:
        raise FormatError(name, f"malformed SentencePiece model: {e}") from None


def looks_like_sentencepiece(data) -> bool:
    """Whether the bytes start as a ModelProto does: its first field is a piece."""
    return len(data) > 2 and data[0] == (1 << 3 | _LEN)
