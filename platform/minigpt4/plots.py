"""Training curves as a PNG, drawn with Pillow (no plotting library in the runtime image)."""
from __future__ import annotations

from pathlib import Path


def plot_curves(history: list[dict], path: str, title: str = "", keys: tuple[str, ...] = ("loss", "lr")) -> str:
    """One panel per key (y against step), stacked; returns the path."""
    from PIL import Image, ImageDraw

    w, panel_h, pad = 720, 240, 56
    img = Image.new("RGB", (w, 30 + panel_h * len(keys)), "white")
    draw = ImageDraw.Draw(img)
    draw.text((pad, 8), title, fill="black")
    steps = [h["step"] for h in history]
    for i, key in enumerate(keys):
        pts = [(h["step"], h[key]) for h in history if h.get(key) is not None]
        top = 30 + i * panel_h
        box = (pad, top + 10, w - 20, top + panel_h - 30)
        draw.rectangle(box, outline="black")
        draw.text((box[0] + 6, box[1] + 4), key, fill="black")
        if not pts:
            continue
        x0, x1 = min(steps), max(max(steps), min(steps) + 1)
        ys = [y for _, y in pts]
        y0, y1 = min(ys), max(ys)
        if y1 - y0 < 1e-12:
            y0, y1 = y0 - 0.5 * abs(y0 or 1), y1 + 0.5 * abs(y1 or 1)

        def xy(x, y):
            return (box[0] + (x - x0) / (x1 - x0) * (box[2] - box[0]),
                    box[3] - (y - y0) / (y1 - y0) * (box[3] - box[1]))

        draw.line([xy(x, y) for x, y in pts], fill=(31, 119, 180), width=2)
        for frac in (0.0, 0.5, 1.0):
            y = y0 + frac * (y1 - y0)
            _, py = xy(x0, y)
            draw.text((4, py - 6), f"{y:.3g}", fill="gray")
        for frac in (0.0, 0.5, 1.0):
            x = x0 + frac * (x1 - x0)
            px, _ = xy(x, y0)
            draw.text((px - 10, box[3] + 4), f"{x:.0f}", fill="gray")
    draw.text((w // 2 - 10, img.height - 16), "step", fill="black")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
