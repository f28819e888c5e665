"""Check the 100-byte header of an audit SQLite file: fields that hold no record but that
drflow's writer always leaves the same (https://sqlite.org/fileformat.html#the_database_header).

SQLite itself ignores several of these bytes (reserved space, the cache-size hint, ...), so a
change there would otherwise go unnoticed.
"""

from __future__ import annotations

import struct

_FIXED = {  # offset: (expected bytes, meaning)
    18: (b"\x02\x02", "file format versions (WAL)"),
    20: (b"\x00\x40\x20\x20", "reserved space and payload fractions"),
    32: (b"\x00" * 8, "freelist (an append-only store frees no page)"),
    44: (b"\x00\x00\x00\x04\x00\x00\x00\x00", "schema format and default cache size"),
    52: (b"\x00" * 4, "auto-vacuum root page"),
    56: (b"\x00\x00\x00\x01", "text encoding (UTF-8)"),
    64: (b"\x00" * 4, "incremental vacuum"),
    72: (b"\x00" * 20, "reserved for expansion"),
}


def header_problem(header: bytes, file_size: int) -> str | None:
    """What is wrong with the first 100 bytes of a quiescent audit file (no WAL), or None.

    Left unchecked, because they legitimately vary: the change counter (24..27, but it must
    equal version-valid-for at 92..95), the schema cookie (40..43), user_version and
    application_id (60..63, 68..71: checked by the caller through SQLite).
    """
    for offset, (expected, what) in _FIXED.items():
        if header[offset:offset + len(expected)] != expected:
            return f"file header bytes {offset}..{offset + len(expected) - 1} altered ({what})"
    page_size = struct.unpack(">H", header[16:18])[0]
    page_size = 65536 if page_size == 1 else page_size
    change, pages = struct.unpack(">II", header[24:32])
    if struct.unpack(">I", header[92:96])[0] != change:
        return "file header change counter and version-valid-for differ (bytes 24..27, 92..95)"
    if pages * page_size != file_size:
        return f"file header says {pages} pages of {page_size} bytes; the file has {file_size}"
    if not 3_000_000 <= struct.unpack(">I", header[96:100])[0] < 4_000_000:
        return "file header SQLite version number altered (bytes 96..99)"
    return None
