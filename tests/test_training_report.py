"""A run's report figures, drawn with matplotlib: the loss curve's axes, ticks and legend, and the contact
sheet's tiles, in the files and sizes that training/dreambooth.py, tuning and the playground read."""

from __future__ import annotations

from PIL import Image

from training.report import contact_sheet, loss_curve, loss_curve_figure, running_average

LOSSES = [0.9, 0.5, 0.7, 0.4, 0.45, 0.3, 0.35, 0.2, 0.25, 0.1, 0.15, 0.12]


def test_the_loss_curve_has_both_series_a_legend_and_whole_step_ticks():
    figure = loss_curve_figure(LOSSES)
    (axis,) = figure.axes
    per_step, average = axis.get_lines()
    assert list(per_step.get_xdata()) == list(range(1, len(LOSSES) + 1))
    assert list(per_step.get_ydata()) == LOSSES
    assert list(average.get_ydata()) == running_average(LOSSES)
    assert [text.get_text() for text in axis.get_legend().get_texts()] == ["loss per step", "running average"]
    assert (axis.get_xlabel(), axis.get_ylabel()) == ("step", "loss")
    steps = [tick for tick in axis.get_xticks() if 1 <= tick <= len(LOSSES)]
    assert len(steps) >= 3 and all(float(tick).is_integer() for tick in steps)
    assert len(axis.get_yticks()) >= 3
    assert axis.get_title() == "training loss (12 steps)"


def test_the_running_average_follows_the_trend():
    assert running_average([1.0, 1.0, 1.0]) == [1.0, 1.0, 1.0]
    smoothed = running_average(LOSSES)
    assert smoothed[0] == LOSSES[0] and smoothed[-1] < smoothed[0]
    assert max(abs(b - a) for a, b in zip(smoothed, smoothed[1:])) < max(abs(b - a) for a, b in zip(LOSSES, LOSSES[1:]))


def test_the_loss_curve_file_keeps_its_size(tmp_path):
    for losses in ([0.5], LOSSES):
        loss_curve(losses, tmp_path / "loss_curve.png")
        assert Image.open(tmp_path / "loss_curve.png").size == (640, 360)


def test_the_contact_sheet_shows_each_image_under_its_caption(tmp_path):
    colours = ["red", "blue", "green", "yellow", "black"]
    images = [
        (f"a photo of sks toy number {index}", Image.new("RGB", (64, 64), colour))
        for index, colour in enumerate(colours)
    ]
    contact_sheet(images, tmp_path / "sheet.png", tile=128)
    sheet = Image.open(tmp_path / "sheet.png").convert("RGB")
    assert sheet.size == (4 * 128, 2 * (128 + 44))
    found = []
    for row in range(2):
        for column in range(4):
            # the middle of each tile's lower part: below the caption, inside the image
            found.append(sheet.getpixel((column * 128 + 64, row * (128 + 44) + 44 + 80)))
    rgb = {colour: Image.new("RGB", (1, 1), colour).getpixel((0, 0)) for colour in colours}
    assert found[:5] == [rgb[colour] for colour in colours]
    assert found[5:] == [(255, 255, 255)] * 3  # the rest of the last row stays empty
