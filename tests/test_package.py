import inspect
import subprocess
import sys

import qua2sedimo


def test_entrypoint_is_async_and_lazy():
    assert inspect.iscoroutinefunction(qua2sedimo.comfy_entrypoint)


def test_imports_without_comfyui():
    code = "import sys, qua2sedimo, qua2sedimo.quant, qua2sedimo.search; assert 'comfy' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_public_api():
    from qua2sedimo.quant import (  # noqa: F401
        METHODS,
        QuantConfig,
        option_table,
        pack_codes,
        quantize_weight,
        unpack_codes,
    )

    assert METHODS == ("uaq", "kmeans_c", "kmeans_a")
