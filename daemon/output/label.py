"""The label: XMP that tells archives and photo tools a trained model restored this photo.

It uses the vocabularies they already read (IPTC's DigitalSourceType, an xmpMM:History event) and
keeps the scan's own XMP (captions, keywords, rights) around it. The details only this daemon knows
(parameters, request id, the scan's SHA-256, the guard's decisions) go under a namespace of its own,
CFD_NS. The label never holds a URL other than these vocabulary terms, nor anything secret.
"""

from __future__ import annotations

import json
import re
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Any

from .metadata import UnsafeXmp, parse_xmp, serialize_xmp

DIGITAL_SOURCE_TYPE = "http://cv.iptc.org/newscodes/digitalsourcetype/compositeWithTrainedAlgorithmicMedia"

CFD_NS = "https://codeformer-daemon.invalid/ns/1.0/"
"""The project's namespace, prefix cfd. A name, not an address: `.invalid` can never resolve (RFC
2606), and the URI stays fixed so that readers can rely on it; a new layout would take /ns/2.0/."""

NS = {
    "x": "adobe:ns:meta/",
    "rdf": "http://www.w3.org/1999/02/22-rdf-syntax-ns#",
    "xmp": "http://ns.adobe.com/xap/1.0/",
    "xmpMM": "http://ns.adobe.com/xap/1.0/mm/",
    "stEvt": "http://ns.adobe.com/xap/1.0/sType/ResourceEvent#",
    "Iptc4xmpExt": "http://iptc.org/std/Iptc4xmpExt/2008-02-29/",
    "tiff": "http://ns.adobe.com/tiff/1.0/",
    "exif": "http://ns.adobe.com/exif/1.0/",
    "cfd": CFD_NS,
}

PREFERRED = {uri: prefix for prefix, uri in NS.items()}
"""The usual prefixes, for namespaces the scan's XMP does not declare already."""

ACTION = "edited"
"""The XMP stEvt:action for changed pixels in the same photo ("converted" is a change of format
only, "derived" a new document); C2PA's matching action is c2pa.edited."""

STALE = ("tiff:Orientation", "tiff:ImageWidth", "tiff:ImageLength", "exif:PixelXDimension",
         "exif:PixelYDimension", "tiff:XResolution", "tiff:YResolution", "tiff:ResolutionUnit",
         "xmp:Thumbnails")
"""Scan properties that the output makes false (its pixels are upright and larger; EXIF carries the
true values) and are dropped even without a label: a kept tiff:Orientation would turn it sideways."""

REPLACED = ("Iptc4xmpExt:DigitalSourceType", "xmp:ModifyDate", "xmp:MetadataDate", "xmpMM:InstanceID")

SECRET_KEYS = re.compile(r"url|uri|key|token|secret|passw|auth|credential|signature", re.IGNORECASE)

NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


@dataclass(frozen=True)
class Provenance:
    """What happened to the scan, for the label and the sidecar."""

    software: str
    """'codeformer-daemon <version>'"""
    model: str
    params: dict[str, Any]
    request_id: str | None
    scan_sha256: str
    restored_at: str
    """ISO 8601 with a time zone."""
    unchanged: bool
    guard: tuple[str, ...]


def _q(name: str) -> str:
    prefix, local = name.split(":")
    return f"{{{NS[prefix]}}}{local}"


def safe_params(params: dict[str, Any]) -> dict[str, Any]:
    """The parameters without anything that could be an address or a secret (a scan's published
    URL, an API key): the label travels with the photo, to anyone."""
    return {k: v for k, v in params.items()
            if not SECRET_KEYS.search(str(k)) and "://" not in json.dumps(v, default=str)}


def sidecar_record(provenance: Provenance) -> dict[str, Any]:
    """The label's record as a JSON-serialisable dict, for `<output>.json`."""
    return {
        "digital_source_type": DIGITAL_SOURCE_TYPE,
        "software": provenance.software,
        "model": provenance.model,
        "params": json.loads(json.dumps(safe_params(provenance.params), default=str)),
        "request_id": provenance.request_id,
        "scan_sha256": provenance.scan_sha256,
        "restored_at": provenance.restored_at,
        "unchanged": provenance.unchanged,
        "guard": list(provenance.guard),
    }


def label_xmp(existing: bytes | None, provenance: Provenance | None) -> bytes | None:
    """The scan's XMP with the label merged in; without a provenance, the scan's XMP as it is.

    Stale properties (STALE) are dropped either way. XMP that is unsafe or not XMP is not kept: the
    result is then the label alone (or None without a label); metadata.xmp_problem says why.
    """
    try:
        root, rdf, prefixes = parse_xmp(existing) if existing is not None else (None, None, {})
    except UnsafeXmp:
        root = rdf = None
    if root is None or rdf is None:
        if provenance is None:
            return None
        root, prefixes = ET.Element(_q("x:xmpmeta")), {}
        rdf = ET.SubElement(root, _q("rdf:RDF"))
    stale = [_drop(rdf, _q(name)) for name in STALE]
    _prune(rdf)
    if provenance is None:  # as it is, unless stale or not UTF-8 (which PNG's iTXt requires)
        if not any(stale) and _is_utf8(existing):
            return existing
        return serialize_xmp(root, prefixes, PREFERRED)
    _merge(rdf, provenance)
    return serialize_xmp(root, prefixes, PREFERRED)


def _merge(rdf: ET.Element, provenance: Provenance) -> None:
    """Add the label to `rdf` as a new rdf:Description. A property the label sets is removed from
    the scan's descriptions first (XMP allows each once); the scan's history events move into the
    label's xmpMM:History, first and in their order."""
    about = next((d.get(_q("rdf:about")) for d in rdf.findall(_q("rdf:Description"))), "") or ""
    history = []
    for prop in _drop(rdf, _q("xmpMM:History")):
        seq = prop.find(_q("rdf:Seq"))
        history.extend(seq.findall(_q("rdf:li")) if seq is not None else ())
    for name in REPLACED:
        _drop(rdf, _q(name))
    _drop(rdf, None)  # an earlier restoration's cfd: properties
    _prune(rdf)
    if len(rdf):
        rdf[-1].tail = "\n  "
    rdf.append(_description(provenance, about, history))


def _is_utf8(data: bytes | None) -> bool:
    try:
        return data is not None and bool(data.decode("utf-8"))
    except UnicodeDecodeError:
        return False


def _prune(rdf: ET.Element) -> None:
    """Remove the rdf:Descriptions that dropping properties left empty."""
    for desc in rdf.findall(_q("rdf:Description")):
        if len(desc) == 0 and set(desc.attrib) <= {_q("rdf:about")}:
            rdf.remove(desc)


def _description(p: Provenance, about: str, history: list[ET.Element]) -> ET.Element:
    params = safe_params(p.params)
    # a new instance id, as XMP asks of every save; derived, so the same restoration labels alike
    seed = f"{CFD_NS}{p.scan_sha256}/{p.request_id}/{p.restored_at}"
    instance = f"xmp.iid:{uuid.uuid5(uuid.NAMESPACE_URL, seed)}"
    desc = ET.Element(_q("rdf:Description"), {_q("rdf:about"): about})
    _text(desc, "Iptc4xmpExt:DigitalSourceType", DIGITAL_SOURCE_TYPE)
    _text(desc, "xmp:ModifyDate", p.restored_at)
    _text(desc, "xmp:MetadataDate", p.restored_at)
    _text(desc, "xmpMM:InstanceID", instance)
    seq = ET.SubElement(ET.SubElement(desc, _q("xmpMM:History")), _q("rdf:Seq"))
    seq.extend(history)
    event = ET.SubElement(seq, _q("rdf:li"), {_q("rdf:parseType"): "Resource"})
    _text(event, "stEvt:action", ACTION)
    _text(event, "stEvt:instanceID", instance)
    _text(event, "stEvt:when", p.restored_at)
    _text(event, "stEvt:softwareAgent", f"{p.software} ({p.model})")
    _text(event, "stEvt:changed", "/")
    _text(event, "stEvt:parameters", "faces restored by a trained model"
          + "".join(f"; {k}={v}" for k, v in params.items()))
    _text(desc, "cfd:model", p.model)
    _text(desc, "cfd:parameters", json.dumps(params, sort_keys=True, default=str))
    if p.request_id is not None:
        _text(desc, "cfd:requestId", p.request_id)
    _text(desc, "cfd:scanSha256", p.scan_sha256)
    _text(desc, "cfd:unchanged", "True" if p.unchanged else "False")  # an XMP Boolean
    if p.guard:
        bag = ET.SubElement(ET.SubElement(desc, _q("cfd:guard")), _q("rdf:Bag"))
        for note in p.guard:
            _text(bag, "rdf:li", note)
    ET.indent(desc, space=" ", level=2)
    desc.tail = "\n "
    return desc


def _text(parent: ET.Element, name: str, value: str) -> None:
    ET.SubElement(parent, _q(name)).text = NOT_XML.sub("", value)  # one control byte voids a packet


def _drop(rdf: ET.Element, tag: str | None) -> list[ET.Element]:
    """Remove property `tag` (element or attribute form) from every rdf:Description; None = every
    cfd: property. Returns the removed elements."""
    def hit(name: str) -> bool:
        return name == tag or (tag is None and name.startswith(f"{{{CFD_NS}}}"))

    removed = []
    for desc in rdf.findall(_q("rdf:Description")):
        for attr in filter(hit, list(desc.attrib)):
            del desc.attrib[attr]
            removed.append(ET.Element(attr))
        for child in [c for c in desc if hit(c.tag)]:
            removed.append(child)
            desc.remove(child)
    return removed
