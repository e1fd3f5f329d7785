"""The output's metadata, label and encoding, read back with Pillow from real files.

Scans are written to disk with their metadata by Pillow, read with read_scan_metadata, labelled
with label_xmp and encoded at 2x with encode; every assertion reads the output file back.
"""

from __future__ import annotations

import io
import json
import random
import re
import struct
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from PIL import ExifTags, Image, ImageCms, ImageOps, IptcImagePlugin, JpegImagePlugin, TiffTags
from PIL.PngImagePlugin import PngInfo

from daemon.output.encode import EXTENSIONS, encode, fit_mode, icc_fits, output_dpi
from daemon.output.label import CFD_NS, DIGITAL_SOURCE_TYPE, Provenance, label_xmp, sidecar_record
from daemon.output.metadata import ScanMetadata, choose_format, read_scan_metadata, xmp_problem

NS = {
    "x": "adobe:ns:meta/",
    "rdf": "http://www.w3.org/1999/02/22-rdf-syntax-ns#",
    "dc": "http://purl.org/dc/elements/1.1/",
    "xmpMM": "http://ns.adobe.com/xap/1.0/mm/",
    "stEvt": "http://ns.adobe.com/xap/1.0/sType/ResourceEvent#",
    "Iptc4xmpExt": "http://iptc.org/std/Iptc4xmpExt/2008-02-29/",
    "tiff": "http://ns.adobe.com/tiff/1.0/",
    "cfd": CFD_NS,
}
IFD, GPS = ExifTags.IFD.Exif, ExifTags.IFD.GPSInfo
ICC = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
SHA = "5" * 64
PUBLISHED = "https://station.example.org/published/3f9c/scan.jpg"
API_KEY = "sk-live-7d1f0c9a2b"
ARTIST = "Zo\u00eb Gro\u00dfmann"

SCAN_XMP = """<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>
<x:xmpmeta xmlns:x="adobe:ns:meta/" x:xmptk="Scanner XMP 1.0">
 <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">
  <rdf:Description rdf:about="" xmlns:dc="http://purl.org/dc/elements/1.1/"
    xmlns:photoshop="http://ns.adobe.com/photoshop/1.0/" photoshop:DateCreated="1952-06-01">
   <dc:description><rdf:Alt><rdf:li xml:lang="x-default">Grandma Rose at the lake, 1952</rdf:li></rdf:Alt></dc:description>
   <dc:subject><rdf:Bag><rdf:li>family</rdf:li><rdf:li>Rose</rdf:li></rdf:Bag></dc:subject>
   <dc:rights><rdf:Alt><rdf:li xml:lang="x-default">\u00a9 Ann Example</rdf:li></rdf:Alt></dc:rights>
  </rdf:Description>
 </rdf:RDF>
</x:xmpmeta>
<?xpacket end="w"?>""".encode("utf-8")


def iim(record: int, dataset: int, value: bytes) -> bytes:
    return bytes([0x1C, record, dataset]) + len(value).to_bytes(2, "big") + value


SCAN_IIM = (iim(1, 90, b"\x1b%G")  # coded character set: UTF-8
            + iim(2, 5, b"Rose at the lake") + iim(2, 25, b"family") + iim(2, 25, b"Rose")
            + iim(2, 120, "Gro\u00dfmutter Rose at the lake, 1952".encode("utf-8"))
            + iim(2, 116, b"(c) Ann Example"))
IIM_READ_BACK = {(1, 90): b"\x1b%G", (2, 5): b"Rose at the lake", (2, 25): [b"family", b"Rose"],
                 (2, 120): "Gro\u00dfmutter Rose at the lake, 1952".encode("utf-8"), (2, 116): b"(c) Ann Example"}


def photoshop_app13(resources: dict[int, bytes]) -> bytes:
    """A JPEG APP13 segment as Photoshop writes it, built by hand (not by the code under test)."""
    body = b"Photoshop 3.0\x00"
    for resource, data in resources.items():
        body += b"8BIM" + struct.pack(">HHI", resource, 0, len(data)) + data + b"\x00" * (len(data) % 2)
    return b"\xff\xed" + struct.pack(">H", 2 + len(body)) + body


def provenance(**changes) -> Provenance:
    values = dict(software="codeformer-daemon 0.1.0", model="codeformer-image-restoration",
                  params={"fidelity": 0.7, "upscale": 2, "face_upsample": True, "image_url": PUBLISHED,
                          "api_key": API_KEY, "webhook": PUBLISHED},
                  request_id="req-8f2e", scan_sha256=SHA, restored_at="2025-03-01T10:20:30+00:00",
                  unchanged=False, guard=("colour invented by the model removed: the scan is toned",))
    values.update(changes)
    return Provenance(**values)


def photo(size: tuple[int, int], seed: int = 1) -> Image.Image:
    """A noisy RGB image: smooth enough to look like a photo's grain, costly enough for JPEG to care."""
    small = (size[0] // 4 + 1, size[1] // 4 + 1)
    noise = random.Random(seed).randbytes(3 * small[0] * small[1])
    return Image.frombytes("RGB", small, noise).resize(size, Image.Resampling.BILINEAR)


def scan_exif(size: tuple[int, int], orientation: int = 1, thumbnail: bool = False) -> bytes:
    """EXIF as a scanner writes it, optionally with an IFD1 thumbnail (a JPEG of the unrestored scan)."""
    exif = Image.Exif()
    exif[0x010F], exif[0x0110] = "EPSON", "Perfection V850"
    exif[0x010E], exif[0x8298] = "Grandma Rose at the lake", "(c) Ann Example"
    exif[0x013B] = ARTIST.encode("utf-8")  # as most tools write non-ASCII text into EXIF
    exif[0x0112] = orientation
    exif[0x011A], exif[0x011B], exif[0x0128] = 600.0, 600.0, 2
    exif[0x0213] = 1
    sub = exif.get_ifd(IFD)
    sub[0x9003] = "1952:06:01 14:30:00"
    sub[0xA002], sub[0xA003] = size
    gps = exif.get_ifd(GPS)
    gps[1], gps[2], gps[3], gps[4] = "N", (46.0, 31.0, 12.5), "E", (7.0, 58.0, 3.0)
    raw = exif.tobytes()
    return _with_ifd1_thumbnail(raw) if thumbnail else raw


def _with_ifd1_thumbnail(raw: bytes) -> bytes:
    """Point IFD0's next-IFD link at an IFD1 holding a small JPEG, as cameras and scanners do."""
    tiff = bytearray(raw[6:])
    order = "<" if tiff[:2] == b"II" else ">"
    (count,) = struct.unpack_from(order + "H", tiff, 8)
    thumb = io.BytesIO()
    Image.new("RGB", (16, 12), (200, 30, 30)).save(thumb, "JPEG")
    ifd1 = len(tiff)
    data = ifd1 + 2 + 2 * 12 + 4
    tiff += struct.pack(order + "H", 2) + struct.pack(order + "HHII", 0x0201, 4, 1, data)
    tiff += struct.pack(order + "HHII", 0x0202, 4, 1, len(thumb.getvalue())) + struct.pack(order + "I", 0)
    tiff += thumb.getvalue()
    struct.pack_into(order + "I", tiff, 8 + 2 + 12 * count, ifd1)
    return b"Exif\x00\x00" + bytes(tiff)


def write_scan(path: Path, fmt: str, size=(120, 90), orientation: int = 1, thumbnail: bool = False) -> Image.Image:
    """A scan on disk with EXIF, ICC, 600 dpi and XMP, in each format's own way; returns its pixels."""
    image = photo(size)
    exif = scan_exif(size, orientation, thumbnail)
    if fmt == "JPEG":  # with Photoshop's APP13: the IIM records and a thumbnail of the scan
        app13 = photoshop_app13({0x0404: SCAN_IIM, 0x040C: b"a thumbnail of the unrestored scan"})
        image.save(path, "JPEG", exif=exif, icc_profile=ICC, dpi=(600, 600), xmp=SCAN_XMP, quality=95, extra=app13)
    elif fmt == "PNG":
        info = PngInfo()
        info.add_itxt("XML:com.adobe.xmp", SCAN_XMP.decode("utf-8"))
        image.save(path, "PNG", exif=exif, icc_profile=ICC, dpi=(600, 600), pnginfo=info)
    else:  # an uncompressed TIFF, as many scanners write; Pillow's own writer keeps the sub-IFDs
        tags = Image.Exif()
        tags.load(exif)
        tags[700], tags[0x013B] = SCAN_XMP, ARTIST.encode("utf-8")  # Pillow reads EXIF text as Latin-1
        tags[0x83BB] = SCAN_IIM
        image.save(path, "TIFF", exif=tags, icc_profile=ICC, dpi=(600, 600))
    return image


def restore(path: Path, fmt: str, *, scale: int = 2, label: bool = True, **kw) -> tuple[Image.Image, bytes]:
    """read_scan_metadata -> label_xmp -> encode of the upright scan at `scale`; the output reopened."""
    metadata = read_scan_metadata(path)
    with Image.open(path) as scan:
        upright = ImageOps.exif_transpose(scan)
    result = upright.resize((upright.width * scale, upright.height * scale))
    out = io.BytesIO()
    encode(result, out, fmt, metadata=metadata, xmp=label_xmp(metadata.xmp, provenance() if label else None), **kw)
    return Image.open(io.BytesIO(out.getvalue())), out.getvalue()


def xmp_of(image: Image.Image) -> ET.Element:
    xmp = image.info["xmp"]
    return ET.fromstring(xmp if isinstance(xmp, bytes) else xmp.encode("utf-8"))


def texts(root: ET.Element, path: str) -> list[str]:
    return [el.text or "" for el in root.iterfind(f".//{path}", NS)]


def assert_scan_xmp_kept_and_labelled(root: ET.Element) -> None:
    assert texts(root, "dc:description/rdf:Alt/rdf:li") == ["Grandma Rose at the lake, 1952"]
    assert texts(root, "dc:subject/rdf:Bag/rdf:li") == ["family", "Rose"]
    assert texts(root, "dc:rights/rdf:Alt/rdf:li") == ["\u00a9 Ann Example"]
    assert texts(root, "Iptc4xmpExt:DigitalSourceType") == [DIGITAL_SOURCE_TYPE]
    assert texts(root, "xmpMM:History/rdf:Seq/rdf:li/stEvt:action") == ["edited"]
    assert texts(root, "xmpMM:History/rdf:Seq/rdf:li/stEvt:softwareAgent") == [
        "codeformer-daemon 0.1.0 (codeformer-image-restoration)"]
    assert json.loads(texts(root, "cfd:parameters")[0]) == {"fidelity": 0.7, "upscale": 2, "face_upsample": True}
    assert texts(root, "cfd:requestId") == ["req-8f2e"]
    assert texts(root, "cfd:scanSha256") == [SHA]
    assert texts(root, "cfd:unchanged") == ["False"]


def assert_exif_kept(exif: Image.Exif, size: tuple[int, int], dpi: float) -> None:
    assert exif[0x010F] == "EPSON" and exif[0x0110] == "Perfection V850"
    assert exif[0x010E] == "Grandma Rose at the lake"
    assert exif[0x013B].encode("latin-1").decode("utf-8") == ARTIST and exif[0x8298] == "(c) Ann Example"
    assert exif[0x0112] == 1
    assert float(exif[0x011A]) == pytest.approx(dpi) and exif[0x0128] == 2
    assert exif.get_ifd(IFD)[0x9003] == "1952:06:01 14:30:00"
    gps = exif.get_ifd(GPS)
    assert gps[1] == "N" and [float(v) for v in gps[2]] == [46.0, 31.0, 12.5]
    assert exif.get_ifd(ExifTags.IFD.IFD1) == {}


# --- format ------------------------------------------------------------------------------------

@pytest.mark.parametrize("setting, scan_format, expected", [
    ("auto", "JPEG", "JPEG"), ("auto", "MPO", "JPEG"), ("auto", "PNG", "PNG"), ("auto", "TIFF", "TIFF"),
    ("auto", "WEBP", "PNG"), ("auto", "BMP", "PNG"), ("auto", None, "PNG"),
    ("png", "JPEG", "PNG"), ("jpeg", "PNG", "JPEG"), ("tiff", "JPEG", "TIFF"), ("webp", "TIFF", "WEBP"),
    (" JPEG ", None, "JPEG"),
])
def test_choose_format(setting, scan_format, expected):
    assert choose_format(setting, scan_format) == expected


def test_choose_format_refuses_an_unknown_setting():
    with pytest.raises(ValueError, match="gif"):
        choose_format("gif", "JPEG")


def test_extensions():
    assert EXTENSIONS == {"JPEG": ".jpg", "PNG": ".png", "TIFF": ".tif", "WEBP": ".webp"}


# --- metadata kept, per format ------------------------------------------------------------------

def test_jpeg_scan_comes_back_with_its_exif_icc_resolution_and_xmp_and_the_label(tmp_path):
    path = tmp_path / "scan.jpg"
    write_scan(path, "JPEG", thumbnail=True)
    with Image.open(path) as scan:  # the fixture really has what the output must lose
        assert scan.getexif().get_ifd(ExifTags.IFD.IFD1)[0x0202] > 0
    out, _ = restore(path, "JPEG")
    assert out.format == "JPEG" and out.size == (240, 180)
    assert out.info["dpi"] == (1200, 1200)
    assert out.info["icc_profile"] == ICC
    exif = out.getexif()
    assert_exif_kept(exif, out.size, 1200)
    assert (exif.get_ifd(IFD)[0xA002], exif.get_ifd(IFD)[0xA003]) == (240, 180)
    assert exif[0x0213] == 1  # YCbCrPositioning, which EXIF requires of a JPEG
    assert_scan_xmp_kept_and_labelled(xmp_of(out))
    assert IptcImagePlugin.getiptcinfo(out) == IIM_READ_BACK
    assert set(out.info["photoshop"]) == {0x0404}  # the scan's thumbnail is not carried


def test_png_scan_comes_back_with_its_exif_icc_resolution_and_xmp_and_the_label(tmp_path):
    path = tmp_path / "scan.png"
    write_scan(path, "PNG")
    out, raw = restore(path, "PNG")
    assert out.format == "PNG" and out.size == (240, 180)
    assert out.info["dpi"] == pytest.approx((1200, 1200), abs=0.01)  # pHYs counts pixels per metre
    assert out.info["icc_profile"] == ICC
    assert_exif_kept(out.getexif(), out.size, 1200)
    assert b"iTXtXML:com.adobe.xmp\x00\x00\x00" in raw  # uncompressed iTXt, where XMP readers look
    assert_scan_xmp_kept_and_labelled(xmp_of(out))


@pytest.mark.parametrize("compression", ["tiff_adobe_deflate", "tiff_lzw", "raw"])
def test_tiff_scan_comes_back_with_its_exif_sub_ifds_icc_resolution_and_xmp(tmp_path, compression):
    path = tmp_path / "scan.tif"
    scan = write_scan(path, "TIFF")
    kept = Image.Exif()
    kept.load(read_scan_metadata(path).exif)  # the scan's IFD0 is its own layout: only descriptions are kept
    assert kept[0x010F] == "EPSON" and not {256, 257, 259, 273, 279, 700, 34675} & set(kept)
    out, _ = restore(path, "TIFF", tiff_compression=compression)
    assert out.format == "TIFF" and out.size == (240, 180)
    assert out.info["compression"] == compression
    assert out.info["dpi"] == (1200, 1200)
    assert out.info["icc_profile"] == ICC
    assert_exif_kept(out.getexif(), out.size, 1200)  # DateTimeOriginal and GPS live in sub-IFDs
    assert 0xA002 not in out.getexif().get_ifd(IFD)  # TIFF/EP has the TIFF's own ImageWidth instead
    assert_scan_xmp_kept_and_labelled(xmp_of(out))
    assert IptcImagePlugin.getiptcinfo(out) == IIM_READ_BACK
    out.load()  # libtiff decodes the file whose first IFD was rewritten
    assert out.tobytes() == scan.resize((240, 180)).tobytes()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "TIFF", "WEBP"])
def test_a_jpeg_scan_keeps_its_metadata_in_every_output_format(tmp_path, fmt):
    path = tmp_path / "scan.jpg"
    write_scan(path, "JPEG")
    out, _ = restore(path, fmt)
    assert out.format == fmt and out.info["icc_profile"] == ICC
    assert_exif_kept(out.getexif(), out.size, 1200)  # WebP has no resolution field but its EXIF's
    assert (0x0213 in out.getexif()) is (fmt != "TIFF")  # YCbCrPositioning: a JPEG's, meaningless in RGB TIFF
    assert_scan_xmp_kept_and_labelled(xmp_of(out))
    # IIM where the format has a place for it; PNG and WebP carry its IPTC Core twin in the XMP
    assert IptcImagePlugin.getiptcinfo(out) == (IIM_READ_BACK if fmt in ("JPEG", "TIFF") else None)


def test_a_tiff_scans_iptc_records_come_back_in_a_jpeg(tmp_path):
    path = tmp_path / "scan.tif"
    write_scan(path, "TIFF")
    out, _ = restore(path, "JPEG")
    assert IptcImagePlugin.getiptcinfo(out) == IIM_READ_BACK


@pytest.mark.filterwarnings("ignore:Metadata Warning")  # Pillow expects one value, Photoshop writes many
def test_iptc_records_typed_long_by_photoshop_are_read_as_bytes(tmp_path):
    """Photoshop types the TIFF IPTC-NAA tag LONG and pads it to four bytes; the records are kept."""
    path = tmp_path / "scan.tif"
    padded = SCAN_IIM + b"\x00" * (-len(SCAN_IIM) % 4)
    tags = Image.Exif()
    tags[0x83BB] = padded
    photo((60, 40)).save(path, "TIFF", exif=tags)  # Pillow writes it UNDEFINED: retyped in place
    data = bytearray(path.read_bytes())
    entry = data.index(struct.pack("<HHI", 0x83BB, TiffTags.UNDEFINED, len(padded)))
    struct.pack_into("<HHI", data, entry, 0x83BB, TiffTags.LONG, len(padded) // 4)
    path.write_bytes(data)
    with Image.open(path) as scan:
        assert scan.tag_v2.tagtype[0x83BB] == 4  # LONG, as Photoshop writes it
    assert read_scan_metadata(path).iptc == SCAN_IIM


@pytest.mark.parametrize("broken", [
    SCAN_IIM[:-3],                                  # the last dataset cut short
    b"\x1d" + SCAN_IIM[1:],                         # not a dataset marker
    b"\x1c\x02\xca\x80\x04" + (70000).to_bytes(4, "big") + b"x" * 70000,  # well formed, over one segment
])
def test_broken_iptc_records_cost_the_records_not_the_delivery(tmp_path, broken):
    if len(broken) > 65000:  # a JPEG segment could not hold it: a TIFF tag can
        path = tmp_path / "scan.tif"
        tags = Image.Exif()
        tags[0x83BB] = broken
        photo((60, 40)).save(path, "TIFF", exif=tags)
    else:
        path = tmp_path / "scan.jpg"
        photo((60, 40)).save(path, "JPEG", extra=photoshop_app13({0x0404: broken}))
    assert read_scan_metadata(path).iptc is None
    out, _ = restore(path, "JPEG")
    assert IptcImagePlugin.getiptcinfo(out) is None


def test_webp_is_lossless():
    image = photo((64, 48))
    out = io.BytesIO()
    encode(image, out, "WEBP", metadata=None, xmp=None)
    assert Image.open(out).convert("RGB").tobytes() == image.tobytes()


def test_without_metadata_only_the_label_is_written(tmp_path):
    path = tmp_path / "scan.jpg"
    write_scan(path, "JPEG")
    out = io.BytesIO()
    encode(photo((240, 180)), out, "JPEG", metadata=None, xmp=label_xmp(None, provenance()))
    back = Image.open(out)
    assert "exif" not in back.info and "icc_profile" not in back.info
    assert back.info["jfif_unit"] == 0  # no resolution claimed
    assert texts(xmp_of(back), "Iptc4xmpExt:DigitalSourceType") == [DIGITAL_SOURCE_TYPE]
    assert texts(xmp_of(back), "dc:subject/rdf:Bag/rdf:li") == []


def test_a_scan_without_metadata_reads_as_none_and_comes_back_bare(tmp_path):
    path = tmp_path / "plain.png"
    photo((40, 30)).save(path)
    metadata = read_scan_metadata(path)
    assert metadata == ScanMetadata(format="PNG", size=(40, 30), upright_size=(40, 30), orientation=1,
                                    exif=None, icc_profile=None, dpi=None, xmp=None)
    out = io.BytesIO()
    encode(photo((80, 60)), out, "PNG", metadata=metadata, xmp=label_xmp(metadata.xmp, None))
    back = Image.open(out)
    assert not {"exif", "icc_profile", "dpi", "xmp"} & set(back.info)


def test_a_broken_exif_costs_the_exif_not_the_delivery(tmp_path):
    path = tmp_path / "scan.jpg"
    broken = b"Exif\x00\x00MM\xa3*\x00\x00\x00\x08" + bytes(40)  # not a TIFF header: Pillow raises
    photo((60, 40)).save(path, exif=broken, icc_profile=ICC, dpi=(600, 600), xmp=SCAN_XMP)
    metadata = read_scan_metadata(path)
    assert metadata.exif is None
    assert (metadata.icc_profile, metadata.dpi, metadata.xmp) == (ICC, (600.0, 600.0), SCAN_XMP)
    out = io.BytesIO()
    encode(photo((120, 80)), out, "JPEG", metadata=metadata, xmp=label_xmp(metadata.xmp, provenance()))
    back = Image.open(out)
    assert back.info["dpi"] == (1200, 1200) and back.getexif()[0x0112] == 1  # an EXIF of its own
    assert_scan_xmp_kept_and_labelled(xmp_of(back))


def test_a_jpeg_without_a_stated_resolution_has_none_not_pillows_72(tmp_path):
    path = tmp_path / "scan.jpg"
    exif = Image.Exif()
    exif[0x010F] = "EPSON"
    photo((40, 30)).save(path, exif=exif.tobytes())
    with Image.open(path) as scan:
        assert scan.info["dpi"] == (72, 72)  # what Pillow makes up
    assert read_scan_metadata(path).dpi is None


def test_an_exif_resolution_in_centimetres_is_read_as_dpi(tmp_path):
    path = tmp_path / "scan.png"
    exif = Image.Exif()
    exif[0x011A], exif[0x011B], exif[0x0128] = 236.22, 236.22, 3
    photo((40, 30)).save(path, exif=exif.tobytes())
    assert read_scan_metadata(path).dpi == pytest.approx((600, 600), abs=0.01)


# --- orientation ------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "TIFF"])
def test_an_orientation_6_scan_comes_back_upright_once_at_twice_the_dpi(tmp_path, fmt):
    path = tmp_path / f"scan{EXTENSIONS[fmt]}"
    write_scan(path, fmt, size=(300, 200), orientation=6)
    metadata = read_scan_metadata(path)
    assert (metadata.size, metadata.upright_size, metadata.orientation) == ((300, 200), (200, 300), 6)
    out, _ = restore(path, fmt)
    assert out.size == (400, 600)
    exif = out.getexif()
    assert exif[0x0112] == 1
    assert (exif.get_ifd(IFD).get(0xA002, 400), exif.get_ifd(IFD).get(0xA003, 600)) == (400, 600)
    assert float(exif[0x011A]) == pytest.approx(1200)
    assert ImageOps.exif_transpose(out).size == (400, 600)  # a reader does not turn it again
    assert texts(xmp_of(out), "tiff:Orientation") == []


def test_a_stale_xmp_orientation_is_dropped_even_without_a_label():
    rotated = b'xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6" photoshop:DateCreated'
    kept = label_xmp(SCAN_XMP.replace(b"photoshop:DateCreated", rotated, 1), None)
    assert b"Orientation" not in kept
    assert texts(ET.fromstring(kept), "dc:subject/rdf:Bag/rdf:li") == ["family", "Rose"]
    assert label_xmp(SCAN_XMP, None) == SCAN_XMP  # nothing stale: the scan's bytes as they are
    text = SCAN_XMP.decode("utf-8")
    utf16 = ('<?xml version="1.0" encoding="UTF-16"?>' + text[text.index("<x:xmpmeta"):]).encode("utf-16")
    as_utf8 = label_xmp(utf16, None)  # PNG's iTXt holds UTF-8 only
    assert texts(ET.fromstring(as_utf8.decode("utf-8")), "dc:subject/rdf:Bag/rdf:li") == ["family", "Rose"]


def test_resolution_scales_by_the_real_factor_along_the_upright_axes():
    rotated = ScanMetadata(format="JPEG", size=(300, 200), upright_size=(200, 300), orientation=6,
                           exif=None, icc_profile=None, dpi=(600.0, 300.0), xmp=None)
    assert output_dpi(rotated, (400, 600)) == (600.0, 1200.0)  # stored x is upright y
    upright = ScanMetadata(format="JPEG", size=(1000, 800), upright_size=(1000, 800), orientation=1,
                           exif=None, icc_profile=None, dpi=(600.0, 600.0), xmp=None)
    assert output_dpi(upright, (1500, 1200)) == (900.0, 900.0)  # 1.5x, whatever upscale was asked


# --- JPEG encoding ------------------------------------------------------------------------------

def test_jpeg_is_4_4_4_and_honours_the_quality():
    image = photo((256, 192))
    sizes, tables = {}, {}
    for quality in (50, 95):
        out = io.BytesIO()
        encode(image, out, "JPEG", metadata=None, xmp=None, jpeg_quality=quality)
        back = Image.open(out)
        assert JpegImagePlugin.get_sampling(back) == 0  # 4:4:4
        sizes[quality], tables[quality] = len(out.getvalue()), sum(back.quantization[0])
    assert sizes[95] > 1.5 * sizes[50]
    assert tables[95] < tables[50] / 4  # finer quantisation at 95


@pytest.mark.parametrize("mode, expected", [("RGBA", "RGB"), ("P", "RGB"), ("LA", "L"), ("L", "L"), ("1", "L"),
                                            ("RGB", "RGB"), ("CMYK", "CMYK")])
def test_jpeg_gets_a_mode_it_can_hold_and_grey_stays_grey(mode, expected):
    image = photo((32, 24)).convert(mode)
    assert fit_mode(image, "JPEG").mode == expected
    out = io.BytesIO()
    encode(image, out, "JPEG", metadata=None, xmp=None)
    assert Image.open(out).mode == expected


def test_an_icc_profile_is_kept_only_on_pixels_of_its_colour_space(tmp_path):
    gray_icc = ICC[:16] + b"GRAY" + ICC[20:]
    assert icc_fits(ICC, "RGB") and not icc_fits(ICC, "L")
    assert icc_fits(gray_icc, "L") and not icc_fits(gray_icc, "RGB")
    path = tmp_path / "scan.jpg"
    write_scan(path, "JPEG")
    metadata = read_scan_metadata(path)
    for image, kept in ((photo((240, 180)).convert("L"), False), (photo((240, 180)), True)):
        out = io.BytesIO()
        encode(image, out, "JPEG", metadata=metadata, xmp=None)
        assert (Image.open(out).info.get("icc_profile") == ICC) is kept


def test_what_a_format_cannot_hold_is_refused_plainly():
    with pytest.raises(ValueError, match="one JPEG segment"):
        encode(photo((8, 8)), io.BytesIO(), "JPEG", metadata=None, xmp=b"<x/>" + b" " * 70000)
    with pytest.raises(ValueError, match="16383"):
        encode(Image.new("RGB", (16384, 1)), io.BytesIO(), "WEBP", metadata=None, xmp=None)


# --- the label --------------------------------------------------------------------------------

def test_the_label_names_the_model_the_request_and_the_scan_but_no_url_or_secret():
    label = label_xmp(None, provenance())
    text = label.decode("utf-8")
    assert API_KEY not in text and "station.example.org" not in text
    namespaces = set(re.findall(r'xmlns:\w+="([^"]+)"', text))
    for url in re.findall(r"https?://[^\s\"<>]+", text):
        assert url in namespaces or url == DIGITAL_SOURCE_TYPE, url
    root = ET.fromstring(label)
    assert texts(root, "Iptc4xmpExt:DigitalSourceType") == [DIGITAL_SOURCE_TYPE]
    assert texts(root, "xmpMM:History/rdf:Seq/rdf:li/stEvt:when") == ["2025-03-01T10:20:30+00:00"]
    assert texts(root, "cfd:guard/rdf:Bag/rdf:li") == ["colour invented by the model removed: the scan is toned"]
    assert json.loads(texts(root, "cfd:parameters")[0]) == {"fidelity": 0.7, "upscale": 2, "face_upsample": True}
    assert texts(ET.fromstring(label_xmp(None, provenance(unchanged=True))), "cfd:unchanged") == ["True"]
    odd = ET.fromstring(label_xmp(None, provenance(guard=("bell\x07 note",), request_id=None)))
    assert texts(odd, "cfd:guard/rdf:Bag/rdf:li") == ["bell note"] and texts(odd, "cfd:requestId") == []


def test_the_sidecar_is_the_same_record_as_json():
    record = sidecar_record(provenance())
    assert json.loads(json.dumps(record)) == {
        "digital_source_type": DIGITAL_SOURCE_TYPE, "software": "codeformer-daemon 0.1.0",
        "model": "codeformer-image-restoration", "params": {"fidelity": 0.7, "upscale": 2, "face_upsample": True},
        "request_id": "req-8f2e", "scan_sha256": SHA, "restored_at": "2025-03-01T10:20:30+00:00",
        "unchanged": False, "guard": ["colour invented by the model removed: the scan is toned"]}


def test_the_label_keeps_earlier_history_and_other_namespaces_and_replaces_a_source_type():
    scan = SCAN_XMP.replace(b"  </rdf:Description>\n", b"""  </rdf:Description>
  <rdf:Description rdf:about="" xmlns:xmpMM="http://ns.adobe.com/xap/1.0/mm/"
    xmlns:stEvt="http://ns.adobe.com/xap/1.0/sType/ResourceEvent#" xmlns:Iptc4xmpExt="http://iptc.org/std/Iptc4xmpExt/2008-02-29/"
    xmlns:lr="http://ns.adobe.com/lightroom/1.0/" Iptc4xmpExt:DigitalSourceType="http://cv.iptc.org/newscodes/digitalsourcetype/print">
   <xmpMM:History><rdf:Seq><rdf:li stEvt:action="created" stEvt:softwareAgent="VueScan 9"/></rdf:Seq></xmpMM:History>
   <lr:hierarchicalSubject><rdf:Bag><rdf:li>people|Rose</rdf:li></rdf:Bag></lr:hierarchicalSubject>
  </rdf:Description>
""")
    once = label_xmp(scan, provenance())
    assert b"xmlns:lr=" in once and b"<lr:hierarchicalSubject>" in once  # the scan's own prefixes
    root = ET.fromstring(once)
    assert texts(root, "dc:subject/rdf:Bag/rdf:li") == ["family", "Rose"]
    attribute = "{%s}DigitalSourceType" % NS["Iptc4xmpExt"]
    assert all(d.get(attribute) is None for d in root.iterfind(".//rdf:Description", NS))
    assert texts(root, "Iptc4xmpExt:DigitalSourceType") == [DIGITAL_SOURCE_TYPE]
    events = root.findall(".//xmpMM:History/rdf:Seq/rdf:li", NS)
    assert events[0].get("{%s}softwareAgent" % NS["stEvt"]) == "VueScan 9"
    assert [e.findtext("stEvt:action", namespaces=NS) for e in events[1:]] == ["edited"]
    twice = ET.fromstring(label_xmp(once, provenance(request_id="req-second")))  # restored again
    assert len(twice.findall(".//xmpMM:History/rdf:Seq/rdf:li", NS)) == 3
    assert texts(twice, "cfd:requestId") == ["req-second"]
    assert len(twice.findall(".//xmpMM:History", NS)) == 1


def test_without_provenance_the_label_is_not_written():
    assert label_xmp(None, None) is None
    assert b"DigitalSourceType" not in label_xmp(SCAN_XMP, None)


BOMB = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">]>
<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">
<rdf:Description rdf:about="" xmlns:dc="http://purl.org/dc/elements/1.1/"><dc:title>&lol2;</dc:title></rdf:Description>
</rdf:RDF></x:xmpmeta>"""


@pytest.mark.parametrize("bad, reason", [
    (BOMB, "DOCTYPE"),
    (b'<!DOCTYPE x SYSTEM "file:///etc/passwd"><x:xmpmeta xmlns:x="adobe:ns:meta/"/>', "DOCTYPE"),
    (b"<x:xmpmeta xmlns:x='adobe:ns:meta/'><rdf:RDF", "not well-formed"),
    (b"<html><body>not xmp</body></html>", "no rdf:RDF"),
    (b"<x:xmpmeta xmlns:x='adobe:ns:meta/'/>", "no rdf:RDF"),
])
def test_unsafe_or_broken_xmp_is_refused_and_the_label_stands_alone(bad, reason):
    assert reason in xmp_problem(bad)
    label = label_xmp(bad, provenance())
    assert b"lol" not in label and b"passwd" not in label and b"html" not in label
    assert texts(ET.fromstring(label), "Iptc4xmpExt:DigitalSourceType") == [DIGITAL_SOURCE_TYPE]
    assert label_xmp(bad, None) is None
    assert xmp_problem(SCAN_XMP) is None
