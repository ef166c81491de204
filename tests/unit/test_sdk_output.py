"""azure-ai-ml's code upload writes a tqdm bar and a colour reset to stderr: none shows (issue 27)."""

from __future__ import annotations

import sys
import threading

from colorama import Fore
from tqdm import tqdm

from dask_amlcompute.backend.sdknotices import without_sdk_output


def upload_like_the_sdk(source: str) -> str:
    """What BlobStorageClient.upload writes around a directory upload (azure-ai-ml 1.x)."""
    with tqdm(total=100, desc=Fore.GREEN + f"Uploading {source} (0.47 MBs)") as bar:
        bar.update(100)
    print(Fore.RESET + "\n", file=sys.stderr)
    return "uploaded"


def test_the_calls_own_stderr_output_is_dropped_and_stderr_restored(capsys):
    stderr = sys.stderr
    assert without_sdk_output(upload_like_the_sdk)("0ac58") == "uploaded"
    assert sys.stderr is stderr
    assert capsys.readouterr().err == ""


def test_other_threads_write_through_while_the_call_runs(capsys):
    started, done = threading.Event(), threading.Event()

    def slow_upload() -> None:
        print("from the SDK", file=sys.stderr)
        started.set()
        done.wait(10)

    call = threading.Thread(target=without_sdk_output(slow_upload))
    call.start()
    assert started.wait(10)
    print("from the user", file=sys.stderr)  # another thread, meanwhile
    done.set()
    call.join(10)
    assert capsys.readouterr().err == "from the user\n"


def test_experimental_notices_are_dropped_and_sas_signatures_masked(caplog):
    import logging

    from dask_amlcompute.backend.sdknotices import _redacting, install_log_filters, redact

    install_log_filters()
    install_log_filters()  # idempotent
    experimental = logging.getLogger("azure.ai.ml._utils._experimental")
    assert len(experimental.filters) == 1
    with caplog.at_level(logging.DEBUG):
        experimental.warning("Class AutoDeleteSettingSchema: This is an experimental class, ...")
        experimental.warning("something else")
        logging.getLogger("urllib3.connectionpool").debug("PUT /c/x?sv=1&sig=%s&se=2", "SIGVALUE")
    assert "experimental class" not in caplog.text and "something else" in caplog.text
    # masked (by our filter, or by mlflow's if a test imported mlflow first: "[REDACTED]")
    assert "SIGVALUE" not in caplog.text and "&se=2" in caplog.text
    assert _redacting in logging.getLogger("urllib3.connectionpool").filters
    assert redact("PUT /c/x?sv=1&sig=SIGVALUE&se=2") == "PUT /c/x?sv=1&sig=***&se=2"
