"""The notebook as committed."""

import json

import torch

import vae_helpers as v

NOTEBOOK = v.ROOT / "M63556AB_RepLearning.ipynb"


def figure_outputs(path=NOTEBOOK):
    nb = json.loads(path.read_text())
    return [
        o
        for c in nb["cells"]
        if c["cell_type"] == "code"
        for o in c["outputs"]
        if o["output_type"] in ("display_data", "execute_result") and "image/png" in o["data"]
    ]


def test_every_figure_is_an_image_png_output_with_alternative_text():
    figures = figure_outputs()
    assert len(figures) >= 14  # one per question at least, and the appendix's
    for o in figures:
        alt = o["metadata"]["image/png"]["alt"]
        assert len(alt) > 20 and "".join(o["data"]["text/plain"]) == f"<figure: {alt}>"


def test_no_output_of_the_notebook_holds_an_html_image():
    nb = json.loads(NOTEBOOK.read_text())
    html = [
        "".join(o.get("data", {}).get("text/html", ""))
        for c in nb["cells"]
        if c["cell_type"] == "code"
        for o in c["outputs"]
    ]
    assert not [h for h in html if "<img" in h]


def test_show_displays_the_figure_as_png_with_its_alternative_text(monkeypatch):
    import base64

    import IPython.display
    import matplotlib.pyplot as plt

    shown = []
    monkeypatch.setattr(
        IPython.display, "display", lambda data, metadata, raw: shown.append((data, metadata))
    )
    plt.plot([0, 1])
    v.show("A rising line.")
    ((data, metadata),) = shown
    assert base64.b64decode(data["image/png"])[:8] == b"\x89PNG\r\n\x1a\n"
    assert (
        metadata == {"image/png": {"alt": "A rising line."}}
        and data["text/plain"] == "<figure: A rising line.>"
    )


def test_kept_models_run_in_float64_so_their_figures_do_not_depend_on_the_cpus_rounding():
    for _, model in v.kept_models():
        assert {p.dtype for p in model.parameters()} == {torch.float64}
        assert v.generate(model, n=2).dtype == torch.float64


def markdown(path=NOTEBOOK):
    nb = json.loads(path.read_text())
    return ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown"]


def test_every_link_within_the_notebook_has_an_anchor_to_land_on():
    import re

    text = "\n".join(markdown())
    anchors = set(re.findall(r'<a id="([^"]+)"></a>', text))
    links = set(re.findall(r"\]\(#([^)]+)\)", text))
    assert links and links <= anchors, links - anchors


# Q7's cells, which issue #26 rewrites and shortens; every other code cell reads as what it shows.
def test_no_code_cell_is_longer_than_fifteen_lines():
    nb = json.loads(NOTEBOOK.read_text())
    long = [
        c["id"]
        for c in nb["cells"]
        if c["cell_type"] == "code" and len("".join(c["source"]).splitlines()) > 15
    ]
    assert not long, long


def test_the_notebook_names_its_kernel_as_jupyterlab_writes_it_on_open():
    from jupyter_client.kernelspec import KernelSpecManager

    spec = KernelSpecManager().get_kernel_spec("python3")
    kernel = json.loads(NOTEBOOK.read_text())["metadata"]["kernelspec"]
    assert kernel == {
        "display_name": spec.display_name,
        "language": spec.language,
        "name": "python3",
    }
