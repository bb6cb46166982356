"""LIST pages read by s3cachefs's own parser (s3cachefs/s3/listparse.py) say what botocore's would,
for the answers of a real SeaweedFS: awkward keys, delimiters, truncated pages, URL-encoded keys."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import botocore.handlers
import botocore.parsers
import botocore.session

from s3cachefs.s3 import make_client
from s3cachefs.s3.listparse import ListParser, parse_list_page
from s3cachefs.s3.sync import parse_timestamp

from .harness import S3Server

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

# Keys an XML parser can get wrong: entities, non-ASCII, spaces at either end, a plus sign (which URL
# encoding and decoding treat specially), nested and empty-looking path parts.
KEYS = [
    "local_content/ab/cd/plain",
    "local_content/ab/cd/a&b<c>d'e\"f",
    "local_content/ab/cd/ünïcødé-ファイル",
    "local_content/ab/cd/ leading and trailing ",
    "local_content/ab/cd/plus+sign%25",
    "local_content/ab/ef/x",
    "local_thumbnails/ab/cd/media/32-32-image-jpeg-crop",
    "top-level",
]
FIELDS = ("Key", "Size", "ETag", "LastModified", "StorageClass")


def _list_shape() -> Any:
    shape = (
        botocore.session.get_session().get_service_model("s3").operation_model("ListObjectsV2").output_shape
    )
    assert shape is not None
    return shape


def _botocore_parse(body: bytes) -> dict[str, Any]:
    shape = _list_shape()
    parsed: dict[str, Any] = botocore.parsers.RestXMLParser(timestamp_parser=parse_timestamp).parse(
        {"body": body, "headers": {}, "status_code": 200}, shape
    )
    return parsed


def _comparable(page: dict[str, Any]) -> dict[str, Any]:
    out = {k: page.get(k) for k in ("IsTruncated", "KeyCount", "NextContinuationToken", "EncodingType", "Prefix", "Delimiter")}  # fmt: skip
    out["Contents"] = [{f: o.get(f) for f in FIELDS} for o in page.get("Contents", [])]
    out["CommonPrefixes"] = page.get("CommonPrefixes", [])
    return out


def _put_keys(s3: S3Client, bucket: str) -> None:
    for i, key in enumerate(KEYS):
        s3.put_object(Bucket=bucket, Key=key, Body=b"x" * i)


def test_list_pages_of_a_real_server_parse_as_botocore_parses_them(s3server: S3Server, bucket: str) -> None:
    s3 = s3server.client()
    _put_keys(s3, bucket)
    cases: list[dict[str, Any]] = [
        {},
        {"Delimiter": "/", "Prefix": "local_content/ab/"},
        {"MaxKeys": 3},
        {"Prefix": "nothing-here/"},
    ]
    bodies: list[bytes] = []

    def keep_body(response_dict: dict[str, Any], **_: Any) -> None:
        bodies.append(response_dict["body"])

    # The raw answer, as botocore receives it, before its parser runs.
    s3.meta.events.register("before-parse.s3.ListObjectsV2", keep_body)
    # Once as botocore asks (EncodingType url, keys come percent-encoded), once with the keys as they
    # are, XML entities and spaces included (servers that ignore EncodingType answer so too).
    for encoded in (True, False):
        if not encoded:
            s3.meta.events.unregister(
                "before-parameter-build.s3.ListObjectsV2",
                botocore.handlers.set_list_objects_encoding_type_url,
            )
        for params in cases:
            s3.list_objects_v2(Bucket=bucket, **params)
            ours = parse_list_page(bodies[-1], parse_timestamp)
            theirs = _botocore_parse(bodies[-1])
            assert _comparable(ours) == _comparable(theirs), (encoded, params)
            if not params:
                assert ours.get("EncodingType") == ("url" if encoded else None)
                assert len(ours["Contents"]) == len(KEYS)
                if not encoded:
                    assert [o["Key"] for o in ours["Contents"]] == sorted(KEYS)
            if params.get("Delimiter"):
                assert ours["CommonPrefixes"], params
            if params.get("MaxKeys"):
                assert ours["IsTruncated"] and ours["NextContinuationToken"]


def test_a_document_that_is_not_a_list_page_is_left_to_botocore() -> None:
    parser = ListParser(timestamp_parser=parse_timestamp)
    shape = _list_shape()
    odd = b'<?xml version="1.0"?><Something xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><KeyCount>0</KeyCount></Something>'
    parsed = parser.parse({"body": odd, "headers": {}, "status_code": 200}, shape)
    assert parsed.get("KeyCount") == 0  # botocore's parse, which reads any root element
    assert "ResponseMetadata" in parsed


def test_the_mounts_client_lists_every_key_as_a_plain_boto3_client_does(
    s3server: S3Server, s3: S3Client, bucket: str
) -> None:
    _put_keys(s3, bucket)
    ours = make_client(s3server.options(bucket))
    for params in ({}, {"Delimiter": "/", "Prefix": "local_content/ab/"}):
        mine = _all_pages(ours, bucket, params)
        assert mine == _all_pages(s3, bucket, params), params
        if not params:
            # botocore asks for URL-encoded keys and decodes them after the parse: still so.
            assert [o["Key"] for p in mine for o in p["Contents"]] == sorted(KEYS)


def _all_pages(client: Any, bucket: str, params: dict[str, Any]) -> list[dict[str, Any]]:
    pages: list[dict[str, Any]] = []
    token = None
    while True:
        extra: dict[str, Any] = {"ContinuationToken": token} if token else {}
        page = client.list_objects_v2(Bucket=bucket, MaxKeys=3, **params, **extra)
        pages.append(_comparable(dict(page)))
        token = page.get("NextContinuationToken")
        if not page.get("IsTruncated"):
            return pages
