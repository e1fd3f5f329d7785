"""One encode, from the decoded image into the output file, with the scan's metadata and the label.

Pillow keeps nothing on its own (JPEG drops everything, PNG all but the ICC profile, TIFF the EXIF),
so every piece is passed explicitly, rewritten where the restoration made it false: the orientation
is 1 (the provider returns upright pixels), the EXIF pixel dimensions are the output's, the scan's
thumbnail is gone, and the resolution grows with the real scale factor so the print size stays.

What each format carries (ICC, resolution, EXIF with its sub-IFDs, XMP, IPTC-IIM):
  JPEG  APP2 ICC, JFIF + EXIF resolution, APP1 EXIF, APP1 XMP (at most 65,502 bytes: no extended XMP),
        APP13 Photoshop 3.0 with the IIM records alone
  PNG   iCCP, pHYs, eXIf, iTXt XML:com.adobe.xmp (PNG has no place for IIM: its IPTC Core twin in XMP)
  TIFF  tag 34675, tags 282/283/296, its IFD0 + EXIF and GPS sub-IFDs (added after libtiff), tag 700,
        tag 33723 (IPTC-NAA)
  WebP  ICCP, EXIF resolution only (the format has no other), EXIF, XMP (no IIM, as PNG); lossless,
        16,383 px a side
Not carried anywhere: the rest of a Photoshop block (thumbnails and digests of the unrestored scan),
PNG text chunks, JPEG comments, MakerNote offsets (the MakerNote is copied as it is).
"""

from __future__ import annotations

import io
import struct
from typing import Any, BinaryIO

from PIL import Image, TiffImagePlugin

from .metadata import IPTC_NAA, LAYOUT_TAGS, ORIENTATION, PHOTOSHOP_IPTC, ScanMetadata, text_as_stored

EXTENSIONS: dict[str, str] = {"JPEG": ".jpg", "PNG": ".png", "TIFF": ".tif", "WEBP": ".webp"}

EXIF_IFD, GPS_IFD, INTEROP_IFD = 0x8769, 0x8825, 0xA005
EXIF_WIDTH, EXIF_HEIGHT = 0xA002, 0xA003
X_RESOLUTION, Y_RESOLUTION, RESOLUTION_UNIT = 0x011A, 0x011B, 0x0128
YCBCR_POSITIONING = 0x0213
XMP_TAG = 700

JPEG_XMP_MAX = 65533 - 29
"""One APP1 segment less its "http://ns.adobe.com/xap/1.0/\\0" header."""

WEBP_MAX_SIDE = 16383

MODES = {
    "JPEG": {"L": "L", "RGB": "RGB", "CMYK": "CMYK", "1": "L", "LA": "L", "La": "L"},
    "PNG": {m: m for m in ("1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16")},
    "TIFF": {m: m for m in ("1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I;16", "I", "F")},
    "WEBP": {"RGB": "RGB", "RGBA": "RGBA"},
}
"""Mode kept per format; any other mode becomes RGB. A grey result stays grey where the format can
hold grey (JPEG keeps L; LA loses only its alpha), since the guard made it grey on purpose."""

ICC_SPACES = {"1": b"GRAY", "L": b"GRAY", "LA": b"GRAY", "I": b"GRAY", "I;16": b"GRAY", "F": b"GRAY",
              "P": b"RGB ", "RGB": b"RGB ", "RGBA": b"RGB ", "CMYK": b"CMYK"}


def encode(image: Image.Image, out: BinaryIO, fmt: str, *, metadata: ScanMetadata | None, xmp: bytes | None,
           jpeg_quality: int = 95, tiff_compression: str = "tiff_adobe_deflate") -> None:
    """Write `image` as `fmt` into `out`, with the scan's metadata (None = keep nothing) and `xmp`.

    The resolution is scaled by the real factor, image.width / metadata.upright_size[0]. Raises
    ValueError for what the format cannot hold (XMP over one JPEG segment, WebP over 16,383 px).
    """
    image = fit_mode(image, fmt)
    dpi = output_dpi(metadata, image.size) if metadata else None
    exif = output_exif(metadata.exif, image.size, dpi) if metadata else None
    icc = metadata.icc_profile if metadata and icc_fits(metadata.icc_profile, image.mode) else None
    options: dict[str, Any] = {"icc_profile": icc} if icc else {}
    if fmt == "JPEG":
        if xmp and len(xmp) > JPEG_XMP_MAX:
            raise ValueError(f"the XMP is {len(xmp)} bytes; one JPEG segment holds {JPEG_XMP_MAX}")
        options.update(quality=jpeg_quality, subsampling=0)  # 4:4:4: no halved colour around faces
        _put(options, dpi=tuple(round(v) for v in dpi) if dpi else None, exif=_bytes(exif), xmp=xmp,
             extra=jpeg_iptc_segment(metadata.iptc) if metadata and metadata.iptc else None)
        image.save(out, "JPEG", **options)
    elif fmt == "PNG":
        from PIL.PngImagePlugin import PngInfo

        info = PngInfo()
        if xmp:
            info.add_itxt("XML:com.adobe.xmp", xmp.decode("utf-8"), zip=False)  # uncompressed, as XMP asks
        _put(options, dpi=dpi, exif=_bytes(exif))
        image.save(out, "PNG", pnginfo=info, **options)
    elif fmt == "WEBP":
        if max(image.size) > WEBP_MAX_SIDE:
            raise ValueError(f"WebP holds at most {WEBP_MAX_SIDE} px a side; the result is {image.size}")
        _put(options, exif=_bytes(exif)[6:] if exif else None, xmp=xmp)  # WebP's EXIF chunk has no "Exif\0\0"
        image.save(out, "WEBP", lossless=True, **options)
    elif fmt == "TIFF":
        out.write(_tiff(image, options, dpi, exif, xmp, metadata.iptc if metadata else None, tiff_compression))
    else:
        raise ValueError(f"unknown output format {fmt!r}")


def jpeg_iptc_segment(iim: bytes) -> bytes:
    """An APP13 segment as Photoshop writes it: "Photoshop 3.0", one 8BIM resource 0x0404 holding
    the IIM records (an empty, padded name; data padded to an even length)."""
    resource = (b"8BIM" + PHOTOSHOP_IPTC.to_bytes(2, "big") + b"\x00\x00" + len(iim).to_bytes(4, "big")
                + iim + b"\x00" * (len(iim) % 2))
    body = b"Photoshop 3.0\x00" + resource
    return b"\xff\xed" + (2 + len(body)).to_bytes(2, "big") + body


def fit_mode(image: Image.Image, fmt: str) -> Image.Image:
    """The image in a mode `fmt` can store (MODES)."""
    mode = MODES[fmt].get(image.mode, "RGB") if fmt in MODES else image.mode
    return image if mode == image.mode else image.convert(mode)


def icc_fits(profile: bytes | None, mode: str) -> bool:
    """Whether the scan's ICC profile describes pixels of `mode`: a Gray profile on an RGB result
    (or an RGB one on a grey result) would be false, and colour-managed readers reject it."""
    return bool(profile) and len(profile) >= 20 and ICC_SPACES.get(mode) == profile[16:20]


def output_dpi(metadata: ScanMetadata, size: tuple[int, int]) -> tuple[float, float] | None:
    """The scan's resolution times the real scale factor: a 600 dpi scan restored at 2x is 1200 dpi.

    Measured against the upright scan, as the result is upright; a rotated scan's x/y swap.
    """
    if metadata.dpi is None:
        return None
    x, y = metadata.dpi[::-1] if metadata.orientation >= 5 else metadata.dpi
    width, height = metadata.upright_size
    return round(x * size[0] / width, 2), round(y * size[1] / height, 2)


def output_exif(raw: bytes | None, size: tuple[int, int], dpi: tuple[float, float] | None) -> Image.Exif | None:
    """The scan's EXIF made true of the output: orientation 1, pixel dimensions and resolution
    rewritten, layout tags and the IFD1 thumbnail (a picture of the unrestored scan) left out."""
    if not raw and dpi is None:
        return None
    exif = Image.Exif()
    if raw:
        exif.load(raw)
    for tag in (LAYOUT_TAGS - {YCBCR_POSITIONING}) & set(exif):  # EXIF requires it in a JPEG
        del exif[tag]
    for values in (exif, exif.get_ifd(EXIF_IFD), exif.get_ifd(GPS_IFD)):
        text_as_stored(values)
    exif[ORIENTATION] = 1
    sub = exif.get_ifd(EXIF_IFD)
    for tag, value in ((EXIF_WIDTH, size[0]), (EXIF_HEIGHT, size[1])):
        if tag in sub:
            sub[tag] = value
    if dpi is not None:
        exif[X_RESOLUTION], exif[Y_RESOLUTION], exif[RESOLUTION_UNIT] = dpi[0], dpi[1], 2
    return exif  # Exif.tobytes writes IFD0 and its EXIF/GPS/Interop IFDs, never IFD1


def _bytes(exif: Image.Exif | None) -> bytes | None:
    return exif.tobytes() if exif is not None else None


def _put(options: dict[str, Any], **values: Any) -> None:
    options.update({k: v for k, v in values.items() if v})


def _tiff(image: Image.Image, options: dict[str, Any], dpi: tuple[float, float] | None,
          exif: Image.Exif | None, xmp: bytes | None, iptc: bytes | None, compression: str) -> bytes:
    """The TIFF, built in memory. libtiff (which Pillow uses for every compressed TIFF) writes the
    pixels, ICC profile and resolution, but cannot write the EXIF and GPS sub-IFDs (Pillow raises),
    so the EXIF and XMP tags are added afterwards by Pillow's own TIFF tag writer (`_with_tags`)."""
    tags: dict[int, Any] = {}
    for tag in set(exif or ()) - {YCBCR_POSITIONING}:  # a JPEG's, meaningless in an RGB TIFF
        value = _sub_ifd(exif, tag) if tag in (EXIF_IFD, GPS_IFD) else exif[tag]
        if value or value == 0:
            tags[tag] = value
    if xmp:
        tags[XMP_TAG] = xmp
    if iptc:
        tags[IPTC_NAA] = iptc
    _put(options, dpi=dpi, compression=None if compression in ("", "none", "raw") else compression)
    buffer = io.BytesIO()
    image.save(buffer, "TIFF", **options)
    return _with_tags(buffer.getvalue(), tags)


def _sub_ifd(exif: Image.Exif, tag: int) -> dict[int, Any]:
    """A sub-IFD as Pillow's TIFF writer takes it; a TIFF's own ImageWidth/Length replace the
    EXIF pixel dimensions, which the TIFF/EP profile does not allow there."""
    values = {k: v for k, v in exif.get_ifd(tag).items() if tag != EXIF_IFD or k not in (EXIF_WIDTH, EXIF_HEIGHT)}
    if tag == EXIF_IFD and INTEROP_IFD in values:
        values[INTEROP_IFD] = exif.get_ifd(INTEROP_IFD)
        if not values[INTEROP_IFD]:
            del values[INTEROP_IFD]
    return values


def _with_tags(tiff: bytes, tags: dict[int, Any]) -> bytes:
    """`tiff` with `tags` (sub-IFDs as dicts) appended and a new IFD0 that holds them.

    The new IFD0 reuses the written one's entries as they are (their values stay where libtiff put
    them), adds or replaces an entry per tag, keeps the tags in order, and the header is pointed at
    it. The old IFD0 stays behind, unreferenced: a few hundred bytes.
    """
    if not tags:
        return tiff
    order = "<" if tiff[:2] == b"II" else ">"
    (first,) = struct.unpack_from(order + "I", tiff, 4)
    (count,) = struct.unpack_from(order + "H", tiff, first)
    entries = {struct.unpack_from(order + "H", tiff, at)[0]: tiff[at:at + 12]
               for at in range(first + 2, first + 2 + 12 * count, 12)}
    (following,) = struct.unpack_from(order + "I", tiff, first + 2 + 12 * count)
    out = bytearray(tiff)
    out += b"\0" * (len(out) % 2)  # an IFD starts on a word boundary
    added = TiffImagePlugin.ImageFileDirectory_v2(ifh=tiff[:8])  # in the file's byte order
    for tag, value in tags.items():
        added[tag] = value
    block = added.tobytes(len(out))  # an IFD of the added tags, then their values and sub-IFDs
    (added_count,) = struct.unpack_from(order + "H", block, 0)
    for at in range(2, 2 + 12 * added_count, 12):
        entries[struct.unpack_from(order + "H", block, at)[0]] = block[at:at + 12]
    out += block
    out += b"\0" * (len(out) % 2)
    new_first = len(out)
    out += struct.pack(order + "H", len(entries)) + b"".join(entries[t] for t in sorted(entries))
    out += struct.pack(order + "I", following)
    out[4:8] = struct.pack(order + "I", new_first)
    return bytes(out)
