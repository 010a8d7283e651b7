"""python -m dihn_dist.retrieve RUN_DIR --query INDEX|IMAGE_PATH [--stage incremental] [--topk 10] [--data DIR]
[--out FILE.png] [--faiss FILE]

Encodes one query with a finished stage's model (INDEX: that image of the prepared query set; IMAGE_PATH:
any image file, preprocessed like the evaluation images), ranks the stage's exported database codes by
Hamming distance (ties by database row, as in the metrics), prints the top k with their labels, and
writes a contact sheet: the query (blue frame) and the results, framed green when relevant (shares a
class with the query) and red when not; grey when the relevance is unknown (an image file without
--query-labels).

With --faiss FILE (written by python -m dihn_dist.export) the top k come from that FAISS index instead,
after checking that it holds exactly the stage's database codes (default stage: the index's). FAISS keeps
its own choice among rows tied at the k-th distance; the k it returns are listed by (distance, row), so
the output equals the exact ranking's up to those ties (and, for an ivf or hnsw index, up to its recall).
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from ..common import errors
from ..common.formats import INCREMENTAL, STAGES
from ..data.loader import Normaliser, eval_batches, eval_crop_ratio
from ..data.parts import MIN_STORED_SIDE
from ..data.prepared import IMAGENET_MEAN, IMAGENET_STD, PreparedData, hide_discarded_loader_noise, load_prepared
from ..method import metrics
from ..models.networks import build_model, encode_batches, input_resolution
from ..training.run_reader import ExportedRun, StageExport, load_run, load_stage
from . import faiss_index

# Contact sheet layout, in pixels.
TILE = 112            # images are scaled to TILE x TILE (small ones with nearest neighbour: no blur)
FRAME = 5             # coloured frame around each tile
GAP = 6               # space around each framed tile
FONT_SIZE = 13
CAPTION_HEIGHT = 34   # two lines of text under each tile
HEADER_HEIGHT = 24    # one line of text at the top
MAX_COLUMNS = 5       # results per row
CELL_WIDTH = TILE + 2 * FRAME + 2 * GAP
CELL_HEIGHT = TILE + 2 * FRAME + 2 * GAP + CAPTION_HEIGHT
SEPARATOR = 16        # blank column between the query and the results
COLOURS = {"query": (40, 90, 220), "relevant": (30, 170, 60), "irrelevant": (220, 40, 40),
           "unknown": (150, 150, 150), "background": (255, 255, 255), "text": (20, 20, 20)}
# Database images are read in batches of this many rows.
DISPLAY_BATCH = 64


@dataclass
class RetrievedItem:
    rank: int                  # 1 = nearest
    index: int                 # database row
    distance: int              # Hamming distance to the query code
    labels: List[str]          # class names of the item
    relevant: Optional[bool]   # shares a class with the query; None when the query's labels are unknown


@dataclass
class Retrieval:
    stage: str
    query: str                         # "query set row N" or the image path
    query_labels: Optional[List[str]]
    query_code: np.ndarray             # int8 +-1
    matches_exported: Optional[bool]   # a query-set row: does its code equal the stage's query_codes.npy row
    items: List[RetrievedItem]
    sheet: Optional[Path] = None
    ranked_by: Optional[str] = None    # the FAISS index that ranked the database (None: the exact ranking)
    note: Optional[str] = None         # why fewer than --topk results came back (an approximate index)


# ----------------------------------------------------------------------------------------------------
# Inputs

def parse_query(text: str) -> Union[int, Path]:
    """An integer is a row of the query set; anything else is an image file."""
    try:
        return int(text)
    except ValueError:
        return Path(text)


def model_resolution(run: ExportedRun, data: PreparedData) -> int:
    """The side the stage's model was trained and evaluated at (the trainer's rule: --resolution, else the
    stored image size for small-cnn, else the architecture's default)."""
    return input_resolution(run.config["arch"], run.config.get("resolution"), data.image_size)


def open_data(run: ExportedRun, data_dir: Optional[str]) -> PreparedData:
    """The prepared data the run was trained on (config.json's, unless --data says where it is now)."""
    path = data_dir or run.config.get("data")
    if not path or not Path(path).is_dir():
        raise FileNotFoundError(f"prepared data folder {path!r} (from {run.root / 'config.json'}) does not exist; "
                                f"pass --data DIR where the run's prepared data is now")
    data = load_prepared(path)
    if not (np.array_equal(data.database_labels, run.database_labels)
            and np.array_equal(data.query_labels, run.query_labels)):
        raise ValueError(f"--data {data.root}: its labels differ from those of the run {run.root} (another "
                         f"preparation); pass --data with the folder the run was trained on")
    return data


def load_network(run: ExportedRun, stage: StageExport) -> torch.nn.Module:
    if not stage.model_path.is_file():
        raise FileNotFoundError(f"{stage.model_path} is missing; the stage's model is needed to encode the query")
    network = build_model(run.config["arch"], run.code_length)
    try:
        network.load_state_dict(torch.load(stage.model_path, map_location="cpu", weights_only=True))
    except (RuntimeError, ValueError, OSError) as error:
        raise ValueError(f"{stage.model_path}: does not load into a {run.config['arch']} network with "
                         f"{run.code_length} bits ({str(error)[:300]})") from error
    return network.eval()


def read_image_file(path: Path):
    from PIL import Image, UnidentifiedImageError
    if not path.is_file():
        raise FileNotFoundError(f"--query {path}: no such image file (an integer selects a row of the query set)")
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise ValueError(f"--query {path}: cannot read the image ({error})") from error
    if min(image.size) < MIN_STORED_SIDE:   # prepare's rule for every stored image, applied to queries too
        raise ValueError(f"--query {path}: {image.size[0]} x {image.size[1]} px; images need both sides >= "
                         f"{MIN_STORED_SIDE} px (prepare refuses smaller ones too)")
    return image


def preprocess_file_image(image, resolution: int, crop_ratio: float) -> torch.Tensor:
    """PIL RGB image -> normalised (1, 3, R, R), as FFCV's evaluation decoder does it: a centre square of
    crop_ratio x the shorter side, resized to R (area averaging when shrinking), ImageNet mean/std."""
    from PIL import Image
    width, height = image.size
    side = int(crop_ratio * min(width, height))
    left, top = (width - side) // 2, (height - side) // 2
    square = image.crop((left, top, left + side, top + side))
    method = Image.Resampling.BOX if side > resolution else Image.Resampling.BILINEAR
    pixels = np.asarray(square.resize((resolution, resolution), method), dtype=np.uint8)
    batch = torch.from_numpy(pixels.copy()).permute(2, 0, 1).unsqueeze(0)
    return Normaliser(torch.device("cpu"))(batch)


def query_set_image(data: PreparedData, index: int, resolution: int, num_workers: int) -> tuple:
    """(normalised (1, 3, R, R) image, 0/1 labels) of a query-set row."""
    if not 0 <= index < data.num_query:
        raise ValueError(f"--query {index}: out of range; the query set of {data.root} has {data.num_query} "
                         f"images (rows 0..{data.num_query - 1})")
    images, _, _ = next(iter(eval_batches(data, "query", batch_size=1, resolution=resolution, device="cpu",
                                          num_workers=num_workers, indices=np.array([index]))))
    return images, data.query_labels[index]


def parse_label_names(text: Optional[str], class_names: Sequence[str]) -> Optional[np.ndarray]:
    """--query-labels "Trouser,Bag" (names or class numbers) -> 0/1 vector; None when not given."""
    if not text:
        return None
    vector = np.zeros(len(class_names), dtype=np.uint8)
    for name in (part.strip() for part in text.split(",")):
        if name in class_names:
            vector[list(class_names).index(name)] = 1
        elif name.isdigit() and int(name) < len(class_names):
            vector[int(name)] = 1
        else:
            raise ValueError(f"--query-labels: unknown class {name!r}; classes: {', '.join(class_names)}")
    return vector


# ----------------------------------------------------------------------------------------------------
# Ranking

def rank_database(query_code: np.ndarray, database_codes: np.ndarray, topk: int) -> tuple:
    """(rows of the top k, their distances): Hamming distance, ties by row (stable sort), as in the metrics."""
    rows, distances = metrics.nearest(torch.from_numpy(query_code[None]), torch.from_numpy(database_codes), topk)
    return rows[0].numpy(), distances[0].numpy()


def open_faiss_index(path, run: ExportedRun, stage: str, exported: StageExport) -> faiss_index.ServedIndex:
    """The FAISS index of --faiss, checked to hold exactly the stage's database codes."""
    served = faiss_index.load_index(path)
    faiss_index.check_serves(served, faiss_index.pack_codes(exported.database_codes), run.code_length,
                       f"{run.root} stage {stage}")
    return served


def rank_with_faiss(served: faiss_index.ServedIndex, query_code: np.ndarray, topk: int) -> tuple:
    """(rows of the top k, their distances) from the FAISS index, by (distance, row); an approximate index
    may return fewer than k."""
    distances, rows = faiss_index.search(served.index, faiss_index.pack_codes(query_code[None]), topk)
    found = rows[0] >= 0
    return rows[0][found], distances[0][found]


def names_of(labels: np.ndarray, class_names: Sequence[str]) -> List[str]:
    return [class_names[k] for k in np.flatnonzero(labels)]


def retrieved_items(order, distances, run: ExportedRun, query_labels: Optional[np.ndarray]) -> List[RetrievedItem]:
    items = []
    for rank, (row, distance) in enumerate(zip(order, distances), start=1):
        labels = run.database_labels[row]
        relevant = None if query_labels is None else bool((labels & query_labels).any())
        items.append(RetrievedItem(rank, int(row), int(distance), names_of(labels, run.class_names), relevant))
    return items


# ----------------------------------------------------------------------------------------------------
# Contact sheet

def to_display(images: torch.Tensor) -> np.ndarray:
    """Normalised (b, 3, R, R) -> uint8 (b, R, R, 3): undo the ImageNet mean/std."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    pixels = (images.cpu() * std + mean).clamp(0, 1).mul(255).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).numpy()


def database_images(data: PreparedData, rows: np.ndarray, resolution: int, num_workers: int) -> Dict[int, np.ndarray]:
    """uint8 HWC images of the given database rows, keyed by row."""
    shown = {}
    for images, _, indices in eval_batches(data, "database", batch_size=DISPLAY_BATCH, resolution=resolution,
                                           device="cpu", num_workers=num_workers, indices=np.asarray(rows)):
        for index, pixels in zip(indices.tolist(), to_display(images)):
            shown[int(index)] = pixels
    return shown


def sheet_size(num_results: int) -> tuple:
    """(width, height) in pixels of the contact sheet of a query and num_results results."""
    columns = max(1, min(num_results, MAX_COLUMNS))
    rows = max(1, math.ceil(num_results / columns))
    return CELL_WIDTH * (1 + columns) + SEPARATOR, HEADER_HEIGHT + CELL_HEIGHT * rows


def caption_font():
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=FONT_SIZE)
    except TypeError:  # Pillow < 10.1 has only its small bitmap font
        return ImageFont.load_default()


def fit_text(draw, text: str, width: int, font) -> str:
    """The text, cut with "..." so it fits `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def draw_cell(sheet, draw, font, x: int, y: int, pixels: np.ndarray, colour, lines: Sequence[str]) -> None:
    from PIL import Image
    image = Image.fromarray(pixels)
    method = Image.Resampling.NEAREST if image.width < TILE else Image.Resampling.BILINEAR
    draw.rectangle([x + GAP, y + GAP, x + GAP + TILE + 2 * FRAME - 1, y + GAP + TILE + 2 * FRAME - 1], fill=colour)
    sheet.paste(image.resize((TILE, TILE), method), (x + GAP + FRAME, y + GAP + FRAME))
    text_y = y + GAP + TILE + 2 * FRAME + 2
    for line in lines:
        draw.text((x + GAP, text_y), fit_text(draw, line, CELL_WIDTH - 2 * GAP, font), fill=COLOURS["text"], font=font)
        text_y += CAPTION_HEIGHT // 2


def relevance_colour(relevant: Optional[bool]):
    return COLOURS["unknown"] if relevant is None else COLOURS["relevant" if relevant else "irrelevant"]


def write_contact_sheet(path: Path, query_pixels: np.ndarray, retrieval: Retrieval,
                        shown: Dict[int, np.ndarray]) -> Path:
    from PIL import Image, ImageDraw
    width, height = sheet_size(len(retrieval.items))
    sheet = Image.new("RGB", (width, height), COLOURS["background"])
    draw = ImageDraw.Draw(sheet)
    font = caption_font()
    known = [item.relevant for item in retrieval.items if item.relevant is not None]
    score = f": {sum(known)}/{len(known)} relevant (green frame: shares a class with the query; red: does not)" \
        if known else " (relevance unknown: pass --query-labels)"
    draw.text((GAP, GAP), f"stage {retrieval.stage}, top {len(retrieval.items)} by Hamming distance{score}",
              fill=COLOURS["text"], font=font)
    query_caption = ", ".join(retrieval.query_labels) if retrieval.query_labels else "labels unknown"
    draw_cell(sheet, draw, font, 0, HEADER_HEIGHT, query_pixels, COLOURS["query"], ["query", query_caption])
    columns = max(1, min(len(retrieval.items), MAX_COLUMNS))
    for slot, item in enumerate(retrieval.items):
        x = CELL_WIDTH + SEPARATOR + CELL_WIDTH * (slot % columns)
        y = HEADER_HEIGHT + CELL_HEIGHT * (slot // columns)
        draw_cell(sheet, draw, font, x, y, shown[item.index], relevance_colour(item.relevant),
                  [f"#{item.rank} d={item.distance} row {item.index}", ", ".join(item.labels)])
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


# ----------------------------------------------------------------------------------------------------
# The command

def retrieve(run_dir, query: Union[int, str, Path], stage: Optional[str] = None, topk: int = 10,
             data_dir: Optional[str] = None, out: Optional[Path] = None, query_labels: Optional[str] = None,
             num_workers: int = 1, write_sheet: bool = True, faiss_path=None) -> Retrieval:
    """Encode the query, rank the stage's database codes (with the FAISS index at `faiss_path` when given),
    write the contact sheet (to out, or by default RUN_DIR/retrieval/STAGE_QUERY.png). Default stage: the
    FAISS index's, else incremental."""
    if topk <= 0:
        raise ValueError(f"--topk: expected a positive number of results, got {topk}")
    if faiss_path:
        faiss_index.require_faiss()  # first: without it nothing else is worth loading
    run = load_run(run_dir)
    if stage is None:
        stage = faiss_index.read_sidecar(Path(faiss_path)).get("stage", INCREMENTAL) if faiss_path \
            else run.published_stage()
    exported = load_stage(run, stage, "--stage")
    served = open_faiss_index(faiss_path, run, stage, exported) if faiss_path else None
    data = open_data(run, data_dir)
    resolution = model_resolution(run, data)
    network = load_network(run, exported)
    query = parse_query(str(query)) if not isinstance(query, int) else query
    if isinstance(query, int):
        images, labels = query_set_image(data, query, resolution, num_workers)
        description = f"query set row {query}"
    else:
        images = preprocess_file_image(read_image_file(query), resolution, eval_crop_ratio(data))
        labels, description = parse_label_names(query_labels, run.class_names), str(query)
    code = encode_batches(network, [(images,)])[0].numpy()
    matches = bool(np.array_equal(code, exported.query_codes[query])) if isinstance(query, int) else None
    k = min(topk, exported.num_database)
    if served is None:
        order, distances = rank_database(code, exported.database_codes, k)
    else:
        order, distances = rank_with_faiss(served, code, k)
    retrieval = Retrieval(stage, description, None if labels is None else names_of(labels, run.class_names), code,
                          matches, retrieved_items(order, distances, run, labels),
                          ranked_by=None if served is None else f"{served.sidecar['faiss_class']} {served.path}",
                          note=None if served is None else faiss_index.shortfall_note(served.index, len(order), k))
    if write_sheet:
        sheet_path = Path(out) if out else default_sheet_path(run, stage, query)
        shown = database_images(data, order, resolution, num_workers)
        retrieval.sheet = write_contact_sheet(sheet_path, to_display(images)[0], retrieval, shown)
    return retrieval


def default_sheet_path(run: ExportedRun, stage: str, query: Union[int, Path]) -> Path:
    name = f"query{query}" if isinstance(query, int) else Path(query).stem
    return run.root / "retrieval" / f"{stage}_{name}.png"


def format_retrieval(retrieval: Retrieval) -> str:
    code = "".join("1" if bit > 0 else "0" for bit in retrieval.query_code)
    labels = ", ".join(retrieval.query_labels) if retrieval.query_labels is not None else "unknown"
    lines = [f"{retrieval.query} (labels: {labels}), stage {retrieval.stage}, code {code}"]
    if retrieval.matches_exported is False:
        lines.append("note: this code differs from the stage's exported query_codes.npy row (encoded on another "
                     "device or library version?)")
    lines.append(f"{'rank':>4}  {'row':>7}  {'distance':>8}  {'relevant':>8}  labels")
    for item in retrieval.items:
        relevant = "-" if item.relevant is None else ("yes" if item.relevant else "no")
        lines.append(f"{item.rank:>4}  {item.index:>7}  {item.distance:>8}  {relevant:>8}  {', '.join(item.labels)}")
    known = [item.relevant for item in retrieval.items if item.relevant is not None]
    if known:
        lines.append(f"{sum(known)}/{len(known)} relevant")
    if retrieval.ranked_by:
        lines.append(f"ranked by FAISS {retrieval.ranked_by} (rows tied at the last distance: FAISS's choice)")
    if retrieval.note:
        lines.append(retrieval.note)
    if retrieval.sheet:
        lines.append(f"contact sheet: {retrieval.sheet}")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m dihn_dist.retrieve", description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("run_dir", metavar="RUN_DIR", help="run folder written by python -m dihn_dist.train")
    parser.add_argument("--query", required=True, help="row of the prepared query set, or an image file")
    parser.add_argument("--stage", choices=STAGES,
                        help="whose model and database codes to use (default: the --faiss index's stage, else "
                             "the run's published one: incremental, or original when only stage 1 finished)")
    parser.add_argument("--topk", type=int, default=10, help="number of results")
    parser.add_argument("--data", help="prepared data folder (default: the run's, from config.json)")
    parser.add_argument("--out", type=Path, help="contact sheet PNG (default: RUN_DIR/retrieval/STAGE_QUERY.png)")
    parser.add_argument("--query-labels", help="classes of an image-file query, comma-separated names or numbers "
                                               "(marks the results relevant or not)")
    parser.add_argument("--faiss", type=Path, metavar="FILE",
                        help="rank with this FAISS index (python -m dihn_dist.export writes it; needs "
                             "pip install 'dihn_dist[serve]') instead of the exact ranking")
    parser.add_argument("--num-workers", type=int, default=1, help="FFCV threads reading the images")
    parser.add_argument("--debug", action="store_true", help="print the traceback of an error too")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    hide_discarded_loader_noise()
    args = parse_args(argv)
    return errors.run_command(lambda: show(args), debug=args.debug)


def show(args) -> int:
    retrieval = retrieve(args.run_dir, args.query, args.stage, args.topk, args.data, args.out,
                         args.query_labels, args.num_workers, faiss_path=args.faiss)
    print(format_retrieval(retrieval))
    return 0
