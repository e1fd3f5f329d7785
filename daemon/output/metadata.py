"""What the scan says about itself, read once, so the output can say it too.

Pillow re-saves none of a scan's metadata by default, so it is read here into plain values (EXIF
bytes, ICC bytes, resolution, XMP) that `encode` writes back explicitly. Nothing here decodes pixels.
The XMP packet is parsed here too, safely (the scanner wrote it, not us), and written back with the
namespace prefixes it came with.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
import xml.parsers.expat
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape, quoteattr

from PIL import Image

FAMILIES = {"JPEG": "JPEG", "MPO": "JPEG", "PNG": "PNG", "TIFF": "TIFF"}
"""Scan formats that come back in their own family under `format: auto` (Pillow opens some camera
JPEGs as MPO); every other format comes back as PNG, which keeps every pixel."""

FORCED = {"png": "PNG", "jpeg": "JPEG", "jpg": "JPEG", "tiff": "TIFF", "tif": "TIFF", "webp": "WEBP"}

ORIENTATION = 0x0112

LAYOUT_TAGS = frozenset({
    0x00FE, 0x00FF, 0x0100, 0x0101, 0x0102, 0x0103, 0x0106, 0x0107, 0x010A, 0x0111, 0x0115, 0x0116,
    0x0117, 0x011C, 0x0118, 0x0119, 0x0122, 0x0123, 0x013D, 0x0140, 0x0142, 0x0143, 0x0144, 0x0145,
    0x014A, 0x0152, 0x0153, 0x0154, 0x0155, 0x0201, 0x0202, 0x0211, 0x0212, 0x0213, 0x0214,
    0x02BC, 0x8773, 0x83BB, 0x8649,
})
"""IFD0 tags that describe the layout of the file they came from (size, strips, tiles, compression,
sample format, colour map, JPEG thumbnail offsets, YCbCr coding), or that `encode` carries by
other means (0x02BC XMP, 0x8773 ICC, 0x83BB IPTC-NAA), or a Photoshop block (0x8649, which holds
thumbnails and layer data of the unrestored scan). Copied into a new file they would be false."""

IPTC_NAA = 0x83BB
"""TIFF tag of the IPTC-IIM records; in a JPEG they sit in Photoshop's APP13, resource 0x0404."""
PHOTOSHOP_IPTC = 0x0404
PHOTOSHOP_TAG = 0x8649
IPTC_MAX = 65533 - 14 - 12
"""What one JPEG APP13 segment holds of IIM records after the "Photoshop 3.0" and 8BIM headers."""


def choose_format(setting: str, scan_format: str | None) -> str:
    """`output.format` and the scan's format -> "JPEG" | "PNG" | "TIFF" | "WEBP".

    `auto` keeps the scan's family (a 2 MB JPEG scan must not come back as a 20 MB PNG); a scan in
    any other format (WebP, BMP, ...) comes back as PNG, lossless and read everywhere.
    """
    setting = setting.strip().lower()
    if setting == "auto":
        return FAMILIES.get((scan_format or "").upper(), "PNG")
    try:
        return FORCED[setting]
    except KeyError:
        raise ValueError(f"unknown output format {setting!r}: auto, png, jpeg, tiff or webp") from None


@dataclass(frozen=True)
class ScanMetadata:
    """The scan's metadata as `encode` needs it; None wherever the scan has none."""

    format: str | None
    size: tuple[int, int]
    """Width and height as the pixels are stored, before the EXIF orientation is applied."""
    upright_size: tuple[int, int]
    """Width and height as the photo is seen (swapped for orientations 5-8): the provider's result is
    upright, so scale factors are measured against this."""
    orientation: int
    exif: bytes | None
    """The EXIF block (TIFF structure, as in a JPEG APP1), layout tags of a TIFF scan removed."""
    icc_profile: bytes | None
    dpi: tuple[float, float] | None
    """Pixels per inch along the stored x and y axes."""
    xmp: bytes | None
    iptc: bytes | None = None
    """The IPTC-IIM records (caption, keywords, credit, rights as news and archive tools read them),
    as stored: a sequence of 0x1C-tagged datasets, proven well formed."""


def read_scan_metadata(path: Path) -> ScanMetadata:
    """The metadata of the scan at `path`, from its header (no pixels are decoded)."""
    with Image.open(path) as image:
        exif = _exif(image)
        orientation = _orientation(exif.get(ORIENTATION))
        size = _stored_size(image)
        upright = (size[1], size[0]) if orientation >= 5 else size
        return ScanMetadata(
            format=image.format,
            size=size,
            upright_size=upright,
            orientation=orientation,
            exif=_exif_bytes(image, exif),
            icc_profile=image.info.get("icc_profile") or None,
            dpi=_dpi(image, exif),
            xmp=_xmp(image),
            iptc=_iptc(image),
        )


def _orientation(value: Any) -> int:
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _stored_size(image: Image.Image) -> tuple[int, int]:
    """Pillow reports a TIFF's size already turned upright; the stored size is in its IFD."""
    tags = getattr(image, "tag_v2", None)
    if tags is not None and 256 in tags and 257 in tags:
        return int(tags[256]), int(tags[257])
    return image.size


def _exif(image: Image.Image) -> Image.Exif:
    """The scan's EXIF (with the orientation a PNG may keep only in its XMP, as exif_transpose
    reads it); empty when it is broken: a damaged EXIF costs the EXIF, never the delivery."""
    try:
        return image.getexif()
    except Exception:  # noqa: BLE001 - Pillow raises SyntaxError, struct.error, TypeError, ... here
        return Image.Exif()


def _exif_bytes(image: Image.Image, exif: Image.Exif) -> bytes | None:
    """The EXIF as a block, if `encode` can rewrite it. A JPEG's, PNG's or WebP's is taken as
    stored; a TIFF's IFD0 *is* the file's own directory, so only its descriptive tags are kept."""
    raw = image.info.get("exif")
    try:
        if isinstance(raw, bytes) and raw:
            source = raw
        elif image.format == "TIFF" and exif:
            for values in (exif, exif.get_ifd(0x8769), exif.get_ifd(0x8825)):  # no pixels are read
                text_as_stored(values)
            source = exif.tobytes()  # reads the sub-IFDs while the file is open
        else:
            return None
        clean = Image.Exif()  # a copy: the image's own Exif of a TIFF is its live directory
        clean.load(source)
        for values in (clean, clean.get_ifd(0x8769), clean.get_ifd(0x8825)):
            text_as_stored(values)
        for tag in LAYOUT_TAGS & set(clean):
            del clean[tag]
        block = clean.tobytes()  # also proves that encode can write it again
    except Exception:  # noqa: BLE001 - as in _exif
        return None
    return raw if raw else block if len(clean) else None


def text_as_stored(values: Any) -> None:
    """EXIF text (in an Exif or a sub-IFD dict) as the file stored it. Pillow reads EXIF text as
    Latin-1 and writes it as ASCII with "?" for the rest, which would turn a UTF-8 caption
    ("Großmutter") into "Gro??mutter"; bytes it writes as they are."""
    for tag, value in list(values.items()):
        if isinstance(value, str) and not value.isascii():
            values[tag] = value.encode("latin-1")


def _dpi(image: Image.Image, exif: Image.Exif) -> tuple[float, float] | None:
    """The resolution the scanner wrote: JFIF, pHYs or TIFF tags, else EXIF; None if there is none.

    Pillow puts a made-up 72 dpi into a JPEG's info when its EXIF has no resolution, so a JPEG's
    info['dpi'] is trusted only when the JFIF header states a unit.
    """
    dpi = image.info.get("dpi")
    if image.format in ("JPEG", "MPO") and image.info.get("jfif_unit") not in (1, 2):
        dpi = None
    if dpi is None:
        dpi = _exif_dpi(exif)
    if dpi is None:
        return None
    x, y = (round(float(v), 2) for v in dpi)
    return (x, y) if x > 0 and y > 0 else None


def _exif_dpi(exif: Image.Exif) -> tuple[float, float] | None:
    x, y, unit = exif.get(0x011A), exif.get(0x011B), exif.get(0x0128, 2)
    try:
        x, y = float(x), float(y if y is not None else x)
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    if unit == 3:  # per centimetre
        return x * 2.54, y * 2.54
    return (x, y) if unit == 2 else None  # unit 1 (none) says only the aspect ratio


def _xmp(image: Image.Image) -> bytes | None:
    """XMP from JPEG APP1, PNG iTXt, WebP XMP chunk or TIFF tag 700, as Pillow puts it in info."""
    xmp = image.info.get("xmp")
    if isinstance(xmp, tuple) and len(xmp) == 1:
        xmp = xmp[0]
    if isinstance(xmp, str):
        xmp = xmp.encode("utf-8")
    return xmp if isinstance(xmp, bytes) and xmp.strip(b"\x00 \t\r\n") else None


def _iptc(image: Image.Image) -> bytes | None:
    """The IIM records from a JPEG's Photoshop APP13 or a TIFF's IPTC-NAA tag (or its Photoshop
    block); None when there are none, they do not parse, or they would not fit one JPEG segment.
    Only the IIM records are taken: the rest of a Photoshop block (thumbnails, the IPTC digest,
    layer data) describes the unrestored scan."""
    data: Any = None
    if image.format in ("JPEG", "MPO"):
        data = (image.info.get("photoshop") or {}).get(PHOTOSHOP_IPTC)
    elif image.format == "TIFF":
        tags = getattr(image, "tag_v2", None)
        # the raw bytes: Photoshop types the tag LONG, which Pillow would turn into numbers
        data = getattr(tags, "_tagdata", {}).get(IPTC_NAA) or (tags.get(IPTC_NAA) if tags is not None else None)
        if data is None and tags is not None and PHOTOSHOP_TAG in tags:
            data = _photoshop_resources(bytes(tags[PHOTOSHOP_TAG])).get(PHOTOSHOP_IPTC)
    if not isinstance(data, bytes) or not data:
        return None
    data = data.rstrip(b"\x00")  # Photoshop pads the records to a multiple of four bytes
    return data if len(data) <= IPTC_MAX and iim_is_well_formed(data) else None


def iim_is_well_formed(data: bytes) -> bool:
    """Whether `data` is a sequence of IIM datasets: 0x1C, record, dataset, a length, that many bytes."""
    at = 0
    while at < len(data):
        if at + 5 > len(data) or data[at] != 0x1C:
            return False
        length = int.from_bytes(data[at + 3:at + 5], "big")
        at += 5
        if length & 0x8000:  # an extended dataset: the next (length & 0x7FFF) bytes hold its length
            width = length & 0x7FFF
            if not 1 <= width <= 4 or at + width > len(data):
                return False
            length = int.from_bytes(data[at:at + width], "big")
            at += width
        at += length
    return at == len(data)


def _photoshop_resources(block: bytes) -> dict[int, bytes]:
    """Photoshop image resources ("8BIM", id, padded Pascal name, length, padded data) by id."""
    resources, at = {}, 0
    while at + 12 <= len(block) and block[at:at + 4] == b"8BIM":
        resource = int.from_bytes(block[at + 4:at + 6], "big")
        name_length = block[at + 6]
        at += 6 + name_length + 1 + ((name_length + 1) % 2)
        if at + 4 > len(block):
            break
        length = int.from_bytes(block[at:at + 4], "big")
        resources[resource] = block[at + 4:at + 4 + length]
        at += 4 + length + length % 2
    return resources


RDF = "{http://www.w3.org/1999/02/22-rdf-syntax-ns#}RDF"
XML_NS = "http://www.w3.org/XML/1998/namespace"
XPACKET_BEGIN = '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>\n'
XPACKET_END = '\n<?xpacket end="w"?>'


class UnsafeXmp(ValueError):
    """The scan's XMP is not kept: it declares a DOCTYPE (entity expansion) or is not XMP at all."""


def xmp_problem(xmp: bytes | None) -> str | None:
    """Why the scan's XMP cannot be kept (for the log), or None when it can (or there is none)."""
    try:
        if xmp is not None:
            parse_xmp(xmp)
    except UnsafeXmp as exc:
        return str(exc)
    return None


def parse_xmp(data: bytes) -> tuple[ET.Element, ET.Element, dict[str, str]]:
    """The packet's root, its rdf:RDF and the prefixes it declares (uri -> prefix); UnsafeXmp if it
    is not XMP. A DOCTYPE is refused before any entity is declared, which keeps billion-laughs and
    external-entity XMP out (defusedxml does the same; it is not a dependency here)."""
    if not data.startswith((b"\xff\xfe", b"\xfe\xff")):  # UTF-16 ends in a NUL of its own
        data = data.rstrip(b"\x00 \t\r\n")  # padding some writers leave after the packet
    seen: list[tuple[str | None, str]] = []

    def refuse(*_: Any) -> None:
        raise UnsafeXmp("the scan's XMP declares a DOCTYPE or an entity; it is not kept")

    parser = xml.parsers.expat.ParserCreate(namespace_separator=" ")
    parser.StartDoctypeDeclHandler = refuse
    parser.EntityDeclHandler = refuse
    parser.StartNamespaceDeclHandler = lambda prefix, uri: seen.append((prefix, uri))
    try:
        parser.Parse(data, True)
        root = ET.fromstring(data)
    except (xml.parsers.expat.ExpatError, ET.ParseError) as exc:
        raise UnsafeXmp(f"the scan's XMP is not well-formed XML ({exc}); it is not kept") from None
    rdf = root if root.tag == RDF else root.find(f".//{RDF}")
    if rdf is None:
        raise UnsafeXmp("the scan's XMP has no rdf:RDF; it is not kept")
    prefixes = {XML_NS: "xml"}
    for prefix, uri in seen:
        if uri not in prefixes:
            _claim(prefixes, uri, prefix)
    return root, rdf, prefixes


def serialize_xmp(root: ET.Element, prefixes: dict[str, str], preferred: dict[str, str]) -> bytes:
    """`root` as an XMP packet, each namespace declared once on the root: with the prefix the
    packet had, else the `preferred` one (uri -> prefix), else nsN. ElementTree alone would rename
    them all ns0, ns1, ... or need its process-wide registry."""
    prefixes = {XML_NS: "xml", **prefixes}
    used = {name[1:].split("}")[0] for el in root.iter() for name in (el.tag, *el.attrib) if name.startswith("{")}
    for uri in sorted(used - prefixes.keys()):
        _claim(prefixes, uri, preferred.get(uri))
    used.discard(XML_NS)  # xml:lang needs no declaration

    def qname(name: str) -> str:
        if not name.startswith("{"):
            return name
        uri, local = name[1:].split("}")
        return f"{prefixes[uri]}:{local}"

    out: list[str] = [XPACKET_BEGIN]

    def write(el: ET.Element, extra: str = "") -> None:
        attrs = "".join(f" {qname(k)}={quoteattr(v)}" for k, v in el.attrib.items())
        if len(el) == 0 and not el.text:
            out.append(f"<{qname(el.tag)}{extra}{attrs}/>")
        else:
            out.append(f"<{qname(el.tag)}{extra}{attrs}>{escape(el.text or '')}")
            for child in el:
                write(child)
            out.append(f"</{qname(el.tag)}>")
        out.append(escape(el.tail or ""))

    root.tail = None
    write(root, "".join(f" xmlns:{prefixes[u]}={quoteattr(u)}" for u in sorted(used, key=prefixes.__getitem__)))
    out.append(XPACKET_END)
    return "".join(out).encode("utf-8")


def _claim(prefixes: dict[str, str], uri: str, prefix: str | None) -> None:
    """Give `uri` its `prefix`, or nsN when that is empty (a default namespace) or taken."""
    n = 0
    while not prefix or prefix in prefixes.values():
        n += 1
        prefix = f"ns{n}"
    prefixes[uri] = prefix
