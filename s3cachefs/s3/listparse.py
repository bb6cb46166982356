"""ListObjectsV2's answer read straight from its XML: the background listing of a large bucket.

botocore parses a response by walking the operation's output shape in Python, 30-35 us per key of a
LIST page on this machine (6-7 ms for a page of 200 keys), in the worker thread that runs the call.
That thread holds the interpreter lock the event loop needs for every FUSE request: a bucket of a
million objects is half a minute of such parsing, and every lookup Synapse makes meanwhile waits its
turn for the lock, again after each SQLite call (which gives the lock up). `ListParser` reads the
same XML with ElementTree in one loop over the elements (about 10 us per key, 2 ms for 200) and
builds the dict botocore would: the members s3cachefs reads (Contents' Key, Size, ETag,
LastModified; CommonPrefixes; IsTruncated, NextContinuationToken, KeyCount) and those botocore's own
handlers read after the call (EncodingType, Prefix, Delimiter, StartAfter: keys come URL-encoded and
botocore decodes them). A Contents entry keeps only Key, Size, ETag, LastModified and StorageClass.
Anything else, or anything it cannot read, is left to botocore's parser; error answers never reach
this code (botocore parses those before it asks for the modeled output).
"""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping
from typing import Any

import botocore.parsers

log = logging.getLogger(__name__)

_TEXT = frozenset(("Name", "Prefix", "Delimiter", "EncodingType", "ContinuationToken", "NextContinuationToken", "StartAfter"))  # fmt: skip
_INT = frozenset(("KeyCount", "MaxKeys"))
_ENTRY_TEXT = frozenset(("Key", "ETag", "StorageClass"))


class ListParser(botocore.parsers.RestXMLParser):
    """botocore's REST-XML parser, with a fast path for ListObjectsV2's output."""

    def __init__(self, timestamp_parser: Callable[[str], Any] | None = None, **kwargs: Any) -> None:
        super().__init__(timestamp_parser=timestamp_parser, **kwargs)
        self.timestamp = timestamp_parser or botocore.parsers.DEFAULT_TIMESTAMP_PARSER

    def parse(self, response: Mapping[str, Any], shape: Any) -> Any:
        if shape is not None and shape.name == "ListObjectsV2Output" and response["status_code"] == 200:
            try:
                parsed = parse_list_page(response["body"], self.timestamp)
            except (ET.ParseError, ValueError, TypeError) as e:
                log.debug("LIST page left to botocore's parser: %s", e)
            else:
                headers = response["headers"]
                parsed["ResponseMetadata"] = {
                    "RequestId": headers.get("x-amz-request-id", ""),
                    "HostId": headers.get("x-amz-id-2", ""),
                    "HTTPStatusCode": response["status_code"],
                    "HTTPHeaders": headers,
                }
                return parsed
        return super().parse(response, shape)


class ParserFactory(botocore.parsers.ResponseParserFactory):
    """botocore's parser factory, handing out ListParser for REST-XML (S3's protocol)."""

    def __init__(self) -> None:
        super().__init__()
        self.defaults: dict[str, Any] = {}

    def set_parser_defaults(self, **kwargs: Any) -> None:
        super().set_parser_defaults(**kwargs)
        self.defaults.update(kwargs)

    def create_parser(self, protocol_name: str) -> botocore.parsers.ResponseParser:
        if protocol_name == "rest-xml":
            return ListParser(**self.defaults)
        parser: botocore.parsers.ResponseParser = super().create_parser(protocol_name)
        return parser


def parse_list_page(body: bytes, timestamp: Callable[[str], Any]) -> dict[str, Any]:
    """The dict botocore makes of a ListObjectsV2 answer (see the module's docstring for which
    members); ValueError if the XML is not a ListBucketResult."""
    root = ET.fromstring(body)
    tag = root.tag
    ns = tag[: tag.index("}") + 1] if tag.startswith("{") else ""
    if tag[len(ns) :] != "ListBucketResult":
        raise ValueError(f"not a ListBucketResult: {tag}")
    cut = len(ns)
    out: dict[str, Any] = {}
    contents: list[dict[str, Any]] = []
    prefixes: list[dict[str, str]] = []
    for child in root:
        name = child.tag[cut:]
        if name == "Contents":
            entry: dict[str, Any] = {}
            for field in child:
                f = field.tag[cut:]
                if f in _ENTRY_TEXT:
                    entry[f] = field.text or ""
                elif f == "Size":
                    entry["Size"] = int(field.text or "0")
                elif f == "LastModified":
                    entry["LastModified"] = timestamp(field.text or "")
            if "Key" not in entry:
                raise ValueError("a Contents entry without a Key")
            contents.append(entry)
        elif name == "CommonPrefixes":
            for field in child:
                if field.tag[cut:] == "Prefix":
                    prefixes.append({"Prefix": field.text or ""})
        elif name == "IsTruncated":
            out["IsTruncated"] = (child.text or "").strip().lower() == "true"
        elif name in _TEXT:
            out[name] = child.text or ""
        elif name in _INT:
            out[name] = int(child.text or "0")
    if contents:
        out["Contents"] = contents
    if prefixes:
        out["CommonPrefixes"] = prefixes
    return out
