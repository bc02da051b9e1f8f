"""What a user reads when the service or the CLI starts: no notice they cannot act on.

transformers says, for each image processor diffusers imports, that without torchvision it falls
back to the PIL one. torchvision is not a dependency of txt2img, so that fallback is the plan.
"""

from __future__ import annotations

import pytest

TORCHVISION_FALLBACK_NOTICES = ("CLIPImageProcessorPil", "SiglipImageProcessorPil")


def test_a_server_start_log_has_no_torchvision_fallback_notice(server, server_home):
    log = (server_home / "server.log").read_text(encoding="utf-8", errors="replace")
    assert "Starting production HTTP BentoServer" in log  # the whole start, warm-up included, is here
    assert [name for name in TORCHVISION_FALLBACK_NOTICES if name in log] == [], log


@pytest.mark.usefixtures("one_torch_thread")
def test_a_cli_generate_run_has_no_torchvision_fallback_notice(run_cli, cli_env, tmp_path):
    # With transformers' own warnings back on (TRANSFORMERS_VERBOSITY=warning), only these go.
    cli_env["TRANSFORMERS_VERBOSITY"] = "warning"
    result = run_cli("generate", "tiny-sd", "a toy", "--steps", "1", "-o", str(tmp_path / "toy.png"), check_rc=0)
    output = result.stdout + result.stderr
    assert [name for name in TORCHVISION_FALLBACK_NOTICES if name in output] == [], output
    assert (tmp_path / "toy.png").is_file()
