"""txt2img endpoints list|invoke|delete: round trips through moto's SageMaker runtime and through a
local /invocations server, and deletion of endpoint, config and model."""

from __future__ import annotations

import base64
import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests
from aws_fixtures import ACCOUNT, FIXTURE_MODEL, REGION, ROLE, make_bucket
from PIL import Image

from jumpstart.deploy import deploy
from txt2img.cli import main

# No test here may leave the machine.
pytestmark = pytest.mark.usefixtures("no_network")


def _jpeg(size: tuple[int, int], color: tuple[int, int, int]) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="JPEG")
    return base64.b64encode(buffer.getvalue()).decode()


def _queue_results(path: str, results: list[dict], region: str = REGION) -> None:
    """moto's documented API for what the next invocations answer."""
    answer = requests.post(
        f"http://motoapi.amazonaws.com/moto-api/static/sagemaker/{path}",
        json={"results": results, "account_id": ACCOUNT, "region": region},
    )
    assert answer.status_code == 201


def test_invoke_decodes_jumpstart_response_into_image_files(aws, tmp_path, capsys):
    deploy(FIXTURE_MODEL, role=ROLE, endpoint_name="art", poll_seconds=0)
    body = {
        "generated_images": [_jpeg((24, 16), (200, 10, 10)), _jpeg((24, 16), (10, 200, 10))],
        "prompt": "a red barn",
    }
    _queue_results("endpoint-results", [{"Body": json.dumps(body), "ContentType": "application/json"}])

    main(["endpoints", "invoke", "art", "a red barn", "-o", str(tmp_path / "out"), "--seed", "4", "--steps", "20"])

    written = sorted((tmp_path / "out").iterdir())
    assert [path.name for path in written] == ["art-0.jpg", "art-1.jpg"]
    images = [Image.open(path) for path in written]
    assert [(image.format, image.size) for image in images] == [("JPEG", (24, 16))] * 2
    assert images[0].getpixel((12, 8))[0] > 150 and images[1].getpixel((12, 8))[1] > 150
    assert capsys.readouterr().out.count("wrote ") == 2


def test_invoke_sends_the_jumpstart_request(aws, sent_requests, tmp_path):
    deploy(FIXTURE_MODEL, role=ROLE, endpoint_name="art", poll_seconds=0)
    _queue_results(
        "endpoint-results",
        [{"Body": json.dumps({"generated_images": [_jpeg((8, 8), (0, 0, 0))]}), "ContentType": "application/json"}],
    )

    main(
        [
            "endpoints",
            "invoke",
            "art",
            "a cat",
            "-o",
            str(tmp_path),
            "--seed",
            "1",
            "--width",
            "512",
            "--height",
            "768",
            "--guidance-scale",
            "7.5",
            "--negative-prompt",
            "blurry",
            "--num-images",
            "1",
        ]
    )

    invocation = next(params for operation, params in sent_requests if operation == "InvokeEndpoint")
    assert invocation["EndpointName"] == "art"
    assert (invocation["ContentType"], invocation["Accept"]) == ("application/json", "application/json;jpeg")
    assert json.loads(invocation["Body"]) == {
        "prompt": "a cat",
        "seed": 1,
        "width": 512,
        "height": 768,
        "guidance_scale": 7.5,
        "negative_prompt": "blurry",
        "num_images_per_prompt": 1,
    }


def test_invoke_async_endpoint_goes_through_s3(aws, sent_requests, tmp_path):
    make_bucket(aws, "my-async")
    deploy(FIXTURE_MODEL, role=ROLE, endpoint_name="slow-art", async_output="s3://my-async/art", poll_seconds=0)
    body = {"generated_images": [_jpeg((16, 16), (0, 0, 250))], "prompt": "a blue sea"}
    _queue_results("async-endpoint-results", [{"data": json.dumps(body), "is_failure": False}])

    main(["endpoints", "invoke", "slow-art", "a blue sea", "-o", str(tmp_path)])

    image = Image.open(tmp_path / "slow-art-0.jpg")
    assert image.size == (16, 16) and image.getpixel((8, 8))[2] > 200
    invocation = next(params for operation, params in sent_requests if operation == "InvokeEndpointAsync")
    assert invocation["InputLocation"].startswith("s3://my-async/art/requests/")
    key = invocation["InputLocation"].removeprefix("s3://my-async/")
    uploaded = aws.client("s3").get_object(Bucket="my-async", Key=key)["Body"].read()
    assert json.loads(uploaded) == {"prompt": "a blue sea"}


def test_invoke_async_failure_is_reported(aws, tmp_path, capsys):
    make_bucket(aws, "my-async")
    deploy(FIXTURE_MODEL, role=ROLE, endpoint_name="slow-art", async_output="s3://my-async/art", poll_seconds=0)
    _queue_results("async-endpoint-results", [{"data": "CUDA out of memory", "is_failure": True}])

    with pytest.raises(SystemExit) as exit_info:
        main(["endpoints", "invoke", "slow-art", "a sea", "-o", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "request to endpoint slow-art ended Failed: CUDA out of memory" in capsys.readouterr().err


def test_invoke_rejects_a_non_jumpstart_answer(aws, tmp_path, capsys):
    deploy(FIXTURE_MODEL, role=ROLE, endpoint_name="art", poll_seconds=0)
    _queue_results("endpoint-results", [{"Body": json.dumps({"outputs": []}), "ContentType": "application/json"}])
    with pytest.raises(SystemExit):
        main(["endpoints", "invoke", "art", "x", "-o", str(tmp_path)])
    assert "has no base64 'generated_images' (keys: ['outputs'])" in capsys.readouterr().err


def test_delete_removes_endpoint_config_model_and_record(aws, capsys):
    deploy(FIXTURE_MODEL, role=ROLE, endpoint_name="art", poll_seconds=0)
    deploy("tiny-sd", role=ROLE, endpoint_name="keep-me", wait=False)

    main(["endpoints", "delete", "art"])

    assert capsys.readouterr().out.splitlines() == [
        "deleted endpoint art",
        "deleted endpoint config art",
        "deleted model art",
    ]
    sagemaker = aws.client("sagemaker")
    assert [e["EndpointName"] for e in sagemaker.list_endpoints()["Endpoints"]] == ["keep-me"]
    assert [c["EndpointConfigName"] for c in sagemaker.list_endpoint_configs()["EndpointConfigs"]] == ["keep-me"]
    assert [m["ModelName"] for m in sagemaker.list_models()["Models"]] == ["keep-me"]
    from jumpstart.records import recorded_endpoints

    assert [record.endpoint.name for record in recorded_endpoints()] == ["keep-me"]


def test_delete_unknown_endpoint_is_one_line(aws, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["endpoints", "delete", "nope"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "txt2img: error: no endpoint named nope in us-west-2\n"


def test_list_joins_aws_status_with_recorded_models(aws, capsys):
    deploy(FIXTURE_MODEL, role=ROLE, endpoint_name="art", poll_seconds=0)
    aws.client("sagemaker").create_model(ModelName="m", ExecutionRoleArn=ROLE, PrimaryContainer={"Image": "img"})
    aws.client("sagemaker").create_endpoint_config(
        EndpointConfigName="other",
        ProductionVariants=[
            {"VariantName": "v", "ModelName": "m", "InstanceType": "ml.m5.large", "InitialInstanceCount": 1}
        ],
    )
    aws.client("sagemaker").create_endpoint(EndpointName="other", EndpointConfigName="other")

    main(["endpoints", "list", "--json"])

    listed = {item["name"]: item for item in json.loads(capsys.readouterr().out)}
    assert (listed["art"]["status"], listed["art"]["model_id"], listed["art"]["instance_type"]) == (
        "InService",
        FIXTURE_MODEL,
        "ml.p3.2xlarge",
    )
    assert (listed["other"]["status"], listed["other"]["model_id"]) == ("InService", None)


class _InvocationsHandler(BaseHTTPRequestHandler):
    """A loopback /invocations server running the packaged inference script on tiny-sd."""

    pipeline = None

    def do_POST(self):  # noqa: N802 - http.server's naming
        from jumpstart import inference_script

        body = self.rfile.read(int(self.headers["Content-Length"]))
        answer = inference_script.transform_fn(
            self.pipeline, body, self.headers["Content-Type"], self.headers["Accept"]
        )
        self.send_response(200 if self.path == "/invocations" else 404)
        self.send_header("Content-Type", self.headers["Accept"])
        self.end_headers()
        self.wfile.write(answer.encode())

    def log_message(self, *args):
        pass


def test_invoke_with_url_talks_to_a_local_invocations_server(tmp_path, capsys, one_torch_thread):
    from catalog.tiny_sd import build_tiny_sd_pipeline

    _InvocationsHandler.pipeline = build_tiny_sd_pipeline()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _InvocationsHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        main(
            [
                "endpoints",
                "invoke",
                "local",
                "a dog",
                "-o",
                str(tmp_path),
                "--steps",
                "2",
                "--num-images",
                "2",
                "--width",
                "32",
                "--height",
                "32",
                "--seed",
                "0",
                "--url",
                f"http://127.0.0.1:{server.server_port}",
            ]
        )
    finally:
        server.shutdown()
    images = [Image.open(tmp_path / f"local-{index}.jpg") for index in range(2)]
    assert [(image.format, image.size) for image in images] == [("JPEG", (32, 32))] * 2


def test_invoke_with_unreachable_url_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["endpoints", "invoke", "local", "a dog", "--url", "http://127.0.0.1:9"])
    assert exit_info.value.code == 2
    assert "Is `bentoml serve` running?" in capsys.readouterr().err


def test_the_network_guard_refuses_non_loopback_connections(monkeypatch):
    import socket

    from aws_fixtures import forbid_network

    attempts = forbid_network(monkeypatch)
    with (
        socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock,
        pytest.raises(AssertionError, match="network connection"),
    ):
        sock.connect(("192.0.2.1", 443))
    assert attempts == [("192.0.2.1", 443)]


def test_invoke_and_delete_find_the_recorded_region(aws, monkeypatch, tmp_path, capsys):
    deploy(FIXTURE_MODEL, role=ROLE, endpoint_name="far", region="eu-west-1", poll_seconds=0)
    body = json.dumps({"generated_images": [_jpeg((8, 8), (1, 2, 3))]})
    _queue_results("endpoint-results", [{"Body": body, "ContentType": "application/json"}], region="eu-west-1")

    main(["endpoints", "invoke", "far", "x", "-o", str(tmp_path)])
    main(["endpoints", "delete", "far"])

    assert (tmp_path / "far-0.jpg").exists()
    assert aws.client("sagemaker", region_name="eu-west-1").list_endpoints()["Endpoints"] == []
