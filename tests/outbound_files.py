"""Files a hospital may send (and hostile ones it must not), built byte by byte.

A hospital's outbound gate lets only allowed, clean types leave (README "What can leave
a hospital, and how it is checked"); tests that need a hospital to send "some bytes"
send :func:`clean_pdf` with their payload inside.
"""

from __future__ import annotations

import struct
import zlib


def pdf_document(
    objects: list[bytes], *, info: dict[str, str] | None = None
) -> bytes:
    """A PDF whose catalog (object 1) has one page (2, 3) plus ``objects`` 4, 5, ...

    ``objects`` are full object bodies (``<< ... >> stream ... endstream`` or a
    dictionary). The page's content is object 4 (so pass a content stream first).
    """
    bodies = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 200 200] /Contents 4 0 R"
        b" /Resources << /Font << /F1 << /Type /Font /Subtype /Type1"
        b" /BaseFont /Helvetica >> >> >> >>",
        *objects,
    ]
    if info:
        pairs = b" ".join(
            b"/" + k.encode() + b" <FEFF" + v.encode("utf-16-be").hex().upper().encode() + b">"
            for k, v in info.items()
        )
        bodies.append(b"<< " + pairs + b" >>")
    out = bytearray(b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for n, body in enumerate(bodies, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % n + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(bodies) + 1)
    for off in offsets:
        out += b"%010d 00000 n \n" % off
    trailer = b"<< /Size %d /Root 1 0 R" % (len(bodies) + 1)
    if info:
        trailer += b" /Info %d 0 R" % len(bodies)
    out += b"trailer\n" + trailer + b" >>\nstartxref\n%d\n%%%%EOF\n" % xref
    return bytes(out)


def stream(data: bytes, *, flate: bool = False) -> bytes:
    if flate:
        data = zlib.compress(data)
        return b"<< /Length %d /Filter /FlateDecode >>\nstream\n" % len(data) + data + (
            b"\nendstream"
        )
    return b"<< /Length %d >>\nstream\n" % len(data) + data + b"\nendstream"


def text_content(text: str) -> bytes:
    escaped = text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
    return b"BT /F1 12 Tf 20 100 Td (" + escaped.encode("latin-1") + b") Tj ET"


def clean_pdf(payload: bytes = b"", text: str = "Design review, case documents") -> bytes:
    """A valid PDF with one page of ``text`` and ``payload`` in an unreferenced stream."""
    objects = [stream(text_content(text), flate=True)]
    if payload:
        objects.append(stream(payload))
    return pdf_document(objects)


def binary_stl(header: bytes = b"yigong test part", triangles: int = 12) -> bytes:
    """A closed box (12 triangles) as binary STL with the given 80-byte header."""
    v = [(x, y, z) for x in (0.0, 10.0) for y in (0.0, 20.0) for z in (0.0, 30.0)]
    faces = [
        (0, 1, 3), (0, 3, 2), (4, 6, 7), (4, 7, 5), (0, 4, 5), (0, 5, 1),
        (2, 3, 7), (2, 7, 6), (0, 2, 6), (0, 6, 4), (1, 5, 7), (1, 7, 3),
    ][:triangles]  # fmt: skip
    out = bytearray(header[:80].ljust(80, b" "))
    out += struct.pack("<I", len(faces))
    for a, b, c in faces:
        out += struct.pack("<3f", 0.0, 0.0, 0.0)
        for i in (a, b, c):
            out += struct.pack("<3f", *v[i])
        out += b"\x00\x00"
    return bytes(out)


def png(text_chunks: dict[str, str] | None = None) -> bytes:
    """A 1x1 grey PNG with ``tEXt`` chunks."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    out = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0))
    for key, value in (text_chunks or {}).items():
        out += chunk(b"tEXt", key.encode("latin-1") + b"\x00" + value.encode("latin-1"))
    out += chunk(b"IDAT", zlib.compress(b"\x00\x80")) + chunk(b"IEND", b"")
    return out


def jpeg_with_exif(exif_text: bytes) -> bytes:
    """A JPEG header with an EXIF APP1 segment holding ``exif_text`` (no image data)."""
    app1 = b"Exif\x00\x00" + exif_text
    return (
        b"\xff\xd8"
        + b"\xff\xe1"
        + struct.pack(">H", len(app1) + 2)
        + app1
        + b"\xff\xda\x00\x02\xff\xd9"
    )


def threemf(title: str = "Tibial guide") -> bytes:
    """A minimal 3MF package (one triangle mesh) with a Title metadata entry."""
    import io
    import zipfile

    model = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<model unit="millimeter" xmlns="http://schemas.microsoft.com/3dmanufacturing/core/2015/02">'
        f'<metadata name="Title">{title}</metadata>'
        "<resources><object id=\"1\" type=\"model\"><mesh><vertices>"
        '<vertex x="0" y="0" z="0"/><vertex x="10" y="0" z="0"/>'
        '<vertex x="0" y="10" z="0"/><vertex x="0" y="0" z="10"/>'
        "</vertices><triangles>"
        '<triangle v1="0" v2="2" v3="1"/><triangle v1="0" v2="1" v3="3"/>'
        '<triangle v1="0" v2="3" v3="2"/><triangle v1="1" v2="2" v3="3"/>'
        "</triangles></mesh></object></resources>"
        '<build><item objectid="1"/></build></model>'
    )
    types = (
        '<?xml version="1.0" encoding="UTF-8"?>'
        '<Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types">'
        '<Default Extension="rels" ContentType="application/'
        'vnd.openxmlformats-package.relationships+xml"/>'
        '<Default Extension="model" ContentType="application/'
        'vnd.ms-package.3dmanufacturing-3dmodel+xml"/>'
        "</Types>"
    )
    rels = (
        '<?xml version="1.0" encoding="UTF-8"?>'
        '<Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships">'
        '<Relationship Target="/3D/3dmodel.model" Id="rel0" '
        'Type="http://schemas.microsoft.com/3dmanufacturing/2013/01/3dmodel"/>'
        "</Relationships>"
    )
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("[Content_Types].xml", types)
        zf.writestr("_rels/.rels", rels)
        zf.writestr("3D/3dmodel.model", model)
    return buf.getvalue()
