"""`attnseg report`: the per-class statistics, contact sheet and HTML page of a dataset folder
(one `attnseg synth` wrote in the VOC layout), for a user's own dataset as for the demo's."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError


def cmd_report(args) -> int:
    from ..settings import PositiveInt, check_value

    per_class = check_value(PositiveInt, args.show_per_class, "report", "show_per_class")
    root = Path(args.folder)
    if not root.is_dir():
        raise UserError(f"{root} is not a folder")
    if not (root / "SegmentationClass").is_dir():
        shards = sorted(root.glob("*.tar"))
        what = (f"WebDataset shards ({len(shards)} .tar files)" if shards
                else "no SegmentationClass folder")
        raise UserError(f"{root} is not a dataset in the VOC layout ({what}): the report reads "
                        "the folders `attnseg synth --format voc` writes")
    from ..synth.report import format_class_statistics, write_report

    page = write_report(root, per_class=per_class)
    stats = json.loads((page.parent / "class_stats.json").read_text())
    print(format_class_statistics(stats))
    print(f"report: {page} and {page.parent / 'contact_sheet.png'}")
    return 0


def register(sub) -> None:
    """Add `report` to the `attnseg` parser."""
    p = sub.add_parser(
        "report", help="per-class statistics, a contact sheet and an HTML page of a dataset",
        description="Write DIR/report/: per-class statistics over every sample (pixel share, "
        "unsure share, mean reliability, empty masks; also class_stats.json), a contact sheet "
        "with up to --show-per-class samples of every class (image | mask overlay | reliability) "
        "and index.html. Reads a folder `attnseg synth` wrote in the VOC layout.")
    p.add_argument("folder", metavar="DIR", help="the dataset folder (attnseg synth's --out)")
    p.add_argument("--show-per-class", type=int, default=4,
                   help="samples of each class on the contact sheet (default: 4)")
    p.set_defaults(func=cmd_report)
