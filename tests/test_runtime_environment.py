"""The container's Python environment: what `cog build` installs is enough to serve predictions.

`cog build` installs cog.yaml's `python_requirements` and the Cog SDK pinned by `build.sdk_version`,
nothing from requirements-dev.txt, so a module that only the development pins provide passes every
other test of the suite and still stops the container at setup. These tests build that environment
(tests/runtime_env.py: a fresh virtualenv, cached in .cache/runtime-venv), import predict.py in it
and serve a prediction with the bundled model through Cog's server started from it, in a copy of
the build context (the project minus what .dockerignore leaves out).
"""

from __future__ import annotations

import ast
import base64
import importlib.metadata
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from unittest import mock

import pytest
from PIL import Image
from runtime_env import BuildError, canonical, cog_config, pins, requirements_file, runtime_venv, sdk_version
from test_workflows import dockerignore_patterns, ignored

from sdcog_tools.cog_schema import write_schema
from sdcog_tools.cog_server import running_server
from sdcog_tools.shapes import silhouette

ROOT = Path(__file__).resolve().parent.parent
COG_SDK = ("cog", "coglet")  # what `cog build` installs besides python_requirements
DEV_TOOLS = ("pytest", "hypothesis", "schemathesis", "ruff", "check-jsonschema")


def predictor_file() -> str:
    return cog_config()["predict"].partition(":")[0]


def entry_files() -> list[str]:
    """What the image runs: the predictor, and the trainer when cog.yaml declares one."""
    return [cog_config()[key].partition(":")[0] for key in ("predict", "train") if cog_config().get(key)]


def _imports(path: Path) -> set[str]:
    """Absolute module names a file imports, at any depth (function-level imports run too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)  # `from pkg import mod`
    return names


def _local_file(module: str) -> Path | None:
    parts = module.split(".")
    for candidate in (ROOT.joinpath(*parts).with_suffix(".py"), ROOT.joinpath(*parts, "__init__.py")):
        if candidate.is_file():
            return candidate
    return None


def runtime_imports() -> dict[str, set[str]]:
    """Third-party top-level modules the predictor and the trainer reach -> the project files that
    import them, following the project's own modules from predict.py and train.py (so development
    tools stay out)."""
    return _reached()[1]


def runtime_files() -> set[str]:
    """The project's own files the predictor and the trainer reach."""
    return _reached()[0]


def _reached() -> tuple[set[str], dict[str, set[str]]]:
    pending, seen, third_party = [ROOT / name for name in entry_files()], set(), {}
    while pending:
        path = pending.pop()
        if path in seen:
            continue
        seen.add(path)
        for module in _imports(path):
            top = module.partition(".")[0]
            if (local := _local_file(module)) is not None:
                pending.append(local)
            elif _local_file(top) is None and top not in sys.stdlib_module_names:
                third_party.setdefault(top, set()).add(path.relative_to(ROOT).as_posix())
    return {path.relative_to(ROOT).as_posix() for path in seen}, third_party


def run_in(venv: Path, code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Python code run by the runtime environment's interpreter, with nothing from outside it."""
    environment = {key: value for key, value in os.environ.items() if not key.startswith("PYTHON")}
    return subprocess.run(
        [str(venv / "bin" / "python"), "-c", code],
        cwd=cwd,
        env={**environment, "PYTHONNOUSERSITE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


# --- Without the environment: the pins agree --------------------------------------------------


def test_cog_yaml_pins_the_cog_sdk_that_requirements_dev_installs():
    dev = pins(ROOT / "requirements-dev.txt")
    assert sdk_version() == dev["cog"] == dev["coglet"], (
        f"cog.yaml build.sdk_version {sdk_version()!r}, requirements-dev.txt cog=={dev.get('cog')} "
        f"coglet=={dev.get('coglet')}: the image and the tests must run the same Cog"
    )


def test_the_runtime_requirements_leave_the_cog_sdk_to_cog_build():
    # `cog build` drops cog and coglet from python_requirements (with a warning): sdk_version pins them.
    assert not set(COG_SDK) & set(pins(requirements_file()))


def test_every_module_the_predictor_imports_is_pinned_in_the_runtime_requirements():
    provided = set(pins(requirements_file())) | set(COG_SDK)
    distributions = importlib.metadata.packages_distributions()
    missing = {
        module: sorted(files)
        for module, files in runtime_imports().items()
        if not {canonical(name) for name in distributions.get(module, [module])} & provided
    }
    assert missing == {}, (
        f"imported at run time but not pinned in {requirements_file().name}, which is all `cog build` "
        f"installs besides the Cog SDK: {missing}"
    )


def test_the_runtime_never_imports_the_development_tools():
    reached = runtime_files()
    assert {"sdcog/generate/engine.py", "sdcog/train/trainer.py"} <= reached
    assert (
        sorted(path for path in reached if not path.startswith("sdcog/") and path not in entry_files()) == []
    )


# --- The environment itself --------------------------------------------------------------------


@pytest.fixture(scope="module")
def venv() -> Path:
    try:
        return runtime_venv()
    except BuildError as error:
        pytest.fail(str(error), pytrace=False)


@pytest.fixture(scope="module")
def build_context(tmp_path_factory) -> Path:
    """The files `cog build` sends to Docker (what .dockerignore keeps), with weights/ empty so
    that setup() loads the bundled model."""
    patterns = dockerignore_patterns((ROOT / ".dockerignore").read_text())
    context = tmp_path_factory.mktemp("build-context") / "src"

    def left_out(directory: str, names: list[str]) -> set[str]:
        relative = Path(directory).relative_to(ROOT)
        return {
            name
            for name in names
            if ignored((relative / name).as_posix(), patterns)
            or (relative == Path("weights") and name != "README.md")
        }

    shutil.copytree(ROOT, context, ignore=left_out, symlinks=True)
    assert (context / predictor_file()).is_file() and (context / "models").is_dir()
    return context


@pytest.fixture(scope="module")
def schema_file(build_context) -> Path:
    """The OpenAPI schema the server validates inputs against. `cog build` writes it with Cog's own
    generator, not with the image's Python, so the development environment writes it here."""
    path = build_context / ".cog" / "openapi_schema.json"
    write_schema(path)
    return path


def installed(venv: Path) -> dict[str, str]:
    result = run_in(
        venv,
        "import importlib.metadata as m, json; "
        "print(json.dumps({d.metadata['Name']: d.version for d in m.distributions()}))",
        venv,
    )
    assert result.returncode == 0, result.stderr
    return {canonical(name): version for name, version in json.loads(result.stdout).items()}


def test_the_environment_holds_the_runtime_pins_and_the_cog_sdk(venv):
    versions = installed(venv)
    wanted = {**pins(requirements_file()), **dict.fromkeys(COG_SDK, sdk_version())}
    # torch from a CPU index is 2.13.0+cpu, which torch==2.13.0 accepts
    assert {name: versions.get(name, "missing").partition("+")[0] for name in wanted} == wanted


def test_the_environment_holds_none_of_the_development_tools(venv):
    versions = installed(venv)
    assert [tool for tool in DEV_TOOLS if tool in versions] == []
    # requirements-dev.txt's other pins may come in only as dependencies of the runtime set
    # (psutil does: accelerate needs it).
    dev_only = set(pins(ROOT / "requirements-dev.txt")) - set(pins(requirements_file())) - set(COG_SDK)
    result = run_in(
        venv,
        "import importlib.metadata as m, json, re; print(json.dumps([re.match(r'[\\w.-]+', r)[0] "
        "for d in m.distributions() for r in (d.requires or []) if 'extra ==' not in r]))",
        venv,
    )
    assert result.returncode == 0, result.stderr
    required = {canonical(name) for name in json.loads(result.stdout)}
    assert sorted(dev_only & set(versions) - required) == []


def test_predict_and_every_module_it_imports_load_in_the_environment(venv, build_context):
    modules = sorted(runtime_imports())
    assert {"cog", "httpx", "torch", "diffusers"} <= set(modules)
    entries = ", ".join(Path(name).stem for name in entry_files())
    code = f"import importlib; [importlib.import_module(name) for name in {modules!r}]; import {entries}"
    result = run_in(venv, code, build_context)
    assert result.returncode == 0, f"in the runtime environment:\n{result.stderr}"


def _libraries_loaded(session: int) -> set[Path]:
    """Files mapped by the processes of a session (the Cog server and its worker)."""
    files = set()
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and os.getsid(int(proc.name)) == session:
                files.update(
                    Path(line.split(maxsplit=5)[5])
                    for line in (proc / "maps").read_text().splitlines()
                    if len(line.split(maxsplit=5)) == 6
                )
        except OSError:  # gone, or not ours to read
            continue
    return files


def _silhouette_uri() -> str:
    buffer = io.BytesIO()
    silhouette("circle", (20, 20, 50, 50)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_the_environment_serves_a_prediction_with_the_bundled_model(venv, build_context, schema_file):
    assert schema_file.is_file()
    # running_server starts the server with this interpreter and puts its directory first on PATH,
    # where the server finds the `python` of its worker: make both the runtime environment's.
    with (
        mock.patch.object(sys, "executable", str(venv / "bin" / "python")),
        running_server(build_context, env={"MODEL_WEIGHTS": "", "PYTHONNOUSERSITE": "1"}) as server,
    ):
        response = server.predict(
            {
                "prompt": "a red circle on a blue background",
                "width": 64,
                "height": 64,
                "num_inference_steps": 2,
                "output_format": "png",
                "seed": 1,
                # the bundled ControlNet ships in the image, and OpenCV (Canny) runs in it
                "controlnet_1": "shapes-silhouette",
                "controlnet_1_image": _silhouette_uri(),
                "controlnet_1_preprocessor": "canny",
                "return_control_maps": True,
            }
        )
        loaded = {path for path in _libraries_loaded(server.process.pid) if "libtorch" in path.name}
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "succeeded", body.get("error") or body.get("logs")
    header, _, payload = body["output"][0].partition(",")
    assert header == "data:image/png;base64"
    with Image.open(io.BytesIO(base64.b64decode(payload))) as image:
        assert (image.format, image.size) == ("PNG", (64, 64))
        assert "Module: canny, Model: shapes-silhouette" in image.info["parameters"]
    assert len(body["output"]) == 2  # the image, then the Canny map
    # the worker ran on the runtime environment's torch, not the development .venv's
    assert loaded and all(venv.resolve() in path.resolve().parents for path in loaded), loaded


def test_the_environment_trains_with_the_bundled_model_through_trainings(venv, build_context, schema_file):
    """`cog train` in the image: the server in training mode (`--x-mode train`, COG_TRAIN_TYPE_STUB,
    and cog.yaml's concurrency, which makes an async train() necessary) runs a short training."""
    from test_training_http import shapes_archive

    train = cog_config()["train"]
    with (
        mock.patch.object(sys, "executable", str(venv / "bin" / "python")),
        running_server(
            build_context, train, env={"MODEL_WEIGHTS": "", "PYTHONNOUSERSITE": "1"}, train=True
        ) as server,
    ):
        response = server.train({"input_images": shapes_archive(4), "max_train_steps": 3, "lora_rank": 2})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "succeeded", body.get("error") or body.get("logs")
    header, _, payload = body["output"]["weights"].partition(",")
    with tarfile.open(fileobj=io.BytesIO(base64.b64decode(payload))) as archive:
        assert {"lora.safetensors", "embeddings.pti", "special_params.json"} <= set(archive.getnames())


def test_the_environment_serves_a_single_file_checkpoint(
    venv, build_context, schema_file, tiny_sd15, tmp_path
):
    """diffusers' single-file loader and the checks before it run on the image's packages alone."""
    from sdcog_tools.single_file_checkpoints import save_checkpoint_dir

    checkpoint = save_checkpoint_dir(tiny_sd15, tmp_path / "weights", name="tiny-sd15.safetensors")
    with (
        mock.patch.object(sys, "executable", str(venv / "bin" / "python")),
        running_server(
            build_context, env={"MODEL_WEIGHTS": str(checkpoint), "PYTHONNOUSERSITE": "1"}
        ) as server,
    ):
        response = server.predict(
            {
                "prompt": "a red circle",
                "width": 64,
                "height": 64,
                "num_inference_steps": 2,
                "output_format": "png",
            }
        )
        setup_log = server.log()
    body = response.json()
    assert body["status"] == "succeeded", body.get("error") or body.get("logs")
    assert "setup: tiny-sd15.safetensors is Stable Diffusion 1.x" in setup_log
    with Image.open(io.BytesIO(base64.b64decode(body["output"][0].partition(",")[2]))) as image:
        assert "Model hash: " in image.info["parameters"]
