"""A real S3-compatible server for tests: moto's server mode on 127.0.0.1, in this process."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator


@contextmanager
def moto_bucket(bucket: str, key_id: str, secret: str) -> Iterator[tuple[str, object]]:
    """(endpoint URL, boto3 client) of a fresh moto server holding one empty ``bucket``."""
    import boto3
    from moto.server import ThreadedMotoServer
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                              aws_access_key_id=key_id, aws_secret_access_key=secret)
        client.create_bucket(Bucket=bucket)
        yield endpoint, client
    finally:
        server.stop()
