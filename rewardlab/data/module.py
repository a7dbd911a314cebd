"""The LightningDataModule: reads, checks, tokenizes (cached) and batches preference pairs for
train/val/test, and keeps the training data position in checkpoints."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from rewardlab.data.batching import LengthGroupedBatchSampler, ListCollator, PairCollator
from rewardlab.data.cache import CACHE_VERSION, PairDataset, Settings, build_cache, summary_line, tokenizer_fingerprint
from rewardlab.data.formatting import FORMATS, SPECIAL_TOKENS_IN_TEXT, ensure_pad_token
from rewardlab.data.groups import PAIRINGS, check_kind
from rewardlab.data.lists import ListDataset, build_list_cache, list_summary, shared_pairs
from rewardlab.data.rows import SCHEMAS, DataError
from rewardlab.data.sources import fingerprint_source

log = logging.getLogger(__name__)
COLUMNS = (
    "prompt",
    "chosen",
    "rejected",
    "margin",
    "subset",
    "tie",
    "responses",
    "ranks",
    "scores",
    "response",
    "score",
)
UNITS = ("pairs", "lists", "points")  # what a training batch holds, decided by the loss (`Loss.unit`)
# The datamodule restores the data position itself (PreferenceDataModule.state_dict), which this
# warning of Lightning's, about DataLoaders without state, does not know.
warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")


class PreferenceDataModule(L.LightningDataModule):
    """Reads, checks, tokenizes (cached) and batches preference pairs for train/val/test."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        train_file: str | None,
        val_file: str | None,
        test_file: str | None,
        batch_size: int,
        max_tokens_per_batch: int | None,
        eval_batch_size: int,
        eval_max_tokens: int | None,
        max_length: int,
        truncation: str,
        schema: str,
        format: str,
        chat_template: str | None,
        columns: dict[str, str],
        on_bad_row: str,
        special_tokens_in_text: str,
        val_fraction: float,
        group_by_length: bool,
        group_batches: int,
        padding_side: str,
        pad_to_multiple_of: int | None,
        max_chunks: int,
        chunk_overhead_tokens: int,
        num_workers: int,
        cache_dir: str,
        report_dir: str | None,
        seed: int,
        ties: str,
        pairs_from: str | None,
        pairs: str,
        min_gap: float,
        attributes: list[str],
        attribute_weights: list[float],
        train_unit: str = "pairs",
    ):
        super().__init__()
        ensure_pad_token(tokenizer)
        for key, value, least in (
            ("batch_size", batch_size, 1),
            ("max_tokens_per_batch", max_tokens_per_batch, 2),
            ("eval_batch_size", eval_batch_size, 1),
            ("eval_max_tokens", eval_max_tokens, 1),
            ("group_batches", group_batches, 1),
            ("max_length", max_length, 2),
            ("pad_to_multiple_of", pad_to_multiple_of, 1),
            ("max_chunks", max_chunks, 1),
            ("chunk_overhead_tokens", chunk_overhead_tokens, 0),
            ("num_workers", num_workers, 0),
        ):
            if value is not None and value < least:
                raise DataError(f"data.{key}={value}: expected an integer >= {least}")
        for key, value, options in (
            ("padding_side", padding_side, ("left", "right")),
            ("truncation", truncation, ("truncate", "drop")),
            ("on_bad_row", on_bad_row, ("error", "skip")),
            ("schema", schema, ("auto", *SCHEMAS)),
            ("format", format, ("auto", *FORMATS)),
            ("special_tokens_in_text", special_tokens_in_text, SPECIAL_TOKENS_IN_TEXT),
            ("ties", ties, ("keep", "skip")),
            ("pairs_from", pairs_from, (None, "rankings", "ratings")),
            ("pairs", pairs, PAIRINGS),
        ):
            if value not in options:
                raise DataError(f"data.{key}: unknown {value!r}; expected one of {', '.join(options)}")
        missing = set(COLUMNS) - set(columns)
        if missing:
            raise DataError(f"data.columns: missing {sorted(missing)}; map each to the column name in your data")
        if not 0.0 <= val_fraction < 1.0:
            raise DataError(f"data.val_fraction={val_fraction}: expected a number in [0, 1)")
        if not (isinstance(min_gap, (int, float)) and 0 <= min_gap < float("inf")):
            raise DataError(f"data.min_gap={min_gap}: expected a finite number >= 0")
        names, weights = list(attributes or []), list(attribute_weights or [])
        if not names or len(set(names)) != len(names) or not all(isinstance(n, str) and n for n in names):
            raise DataError(f"data.attributes={names}: expected a list of distinct attribute names")
        if len(weights) != len(names) or not all(isinstance(w, (int, float)) and abs(w) < math.inf for w in weights):
            raise DataError(
                f"data.attribute_weights={weights}: expected one finite number per attribute of data.attributes {names}"
            )
        attributes = dict(zip(names, map(float, weights)))
        if train_unit not in UNITS:
            raise DataError(f"train_unit: unknown {train_unit!r}; expected one of {', '.join(UNITS)}")
        self.tokenizer = tokenizer
        self.files = {"train": train_file, "val": val_file, "test": test_file}
        self.settings = Settings(
            schema,
            format,
            chat_template,
            dict(columns),
            max_length,
            truncation,
            on_bad_row,
            special_tokens_in_text,
            ties,
            pairs,
            float(min_gap),
            attributes,
        )
        self.pairs_from, self.train_unit = pairs_from, train_unit
        self.lists: dict[str, ListDataset] = {}  # lists for training (plackett_luce, regression) and test (ratings)
        self.batch_size, self.eval_batch_size, self.eval_max_tokens = batch_size, eval_batch_size, eval_max_tokens
        self.max_tokens_per_batch = max_tokens_per_batch
        self.train_sampler: LengthGroupedBatchSampler | None = None
        self.val_fraction, self.group_by_length, self.group_batches = val_fraction, group_by_length, group_batches
        collator = (tokenizer.pad_token_id, padding_side, pad_to_multiple_of, max_chunks, chunk_overhead_tokens)
        self.collator, self.list_collator = PairCollator(*collator), ListCollator(*collator)
        self.num_workers, self.seed = num_workers, seed
        self.cache_dir = Path(cache_dir)
        self.report_dir = Path(report_dir) if report_dir else None
        self.datasets: dict[str, PairDataset] = {}
        self.resume: dict[str, int] | None = None  # a checkpoint's data position, until the loader uses it
        self._cache_paths: dict[str, Path] = {}
        self._fingerprints: dict[str, str] = {}

    def cache_path(self, split: str) -> Path:
        """Where the split's tokens are cached: keyed by the data's content, tokenizer and settings
        (hashed once per split and remembered)."""
        if split not in self._cache_paths:
            self._cache_paths[split] = self._cache_key_path(split)
        return self._cache_paths[split]

    def fingerprint(self, split: str) -> str:
        """The split's data fingerprint (`fingerprint_source`), computed once: it keys the token cache and
        names the test data in results (`test/data_hash`)."""
        if split not in self._fingerprints:
            self._fingerprints[split] = fingerprint_source(self.files[split], split)
        return self._fingerprints[split]

    def _cache_key_path(self, split: str) -> Path:
        key = hashlib.sha256(
            json.dumps(
                [
                    CACHE_VERSION,
                    self.fingerprint(split),
                    tokenizer_fingerprint(self.tokenizer),
                    vars(self.settings),
                ],
                sort_keys=True,
                default=str,
            ).encode()
        ).hexdigest()[:20]
        return self.cache_dir / f"{split}-{key}"

    def list_cache_path(self, split: str) -> Path:
        """Where the split's groups are cached (`rewardlab.data.lists`), beside its pairs."""
        pairs = self.cache_path(split)
        return pairs.with_name(f"lists-{pairs.name}")

    def list_splits(self) -> list[str]:
        """The splits read as groups: training for a listwise or pointwise loss, and test for regression
        (its per-attribute errors)."""
        if self.train_unit == "pairs":
            return []
        return ["train"] + (["test"] if self.train_unit == "points" and self.files["test"] else [])

    def pair_splits(self) -> list[str]:
        """The splits read as pairs: validation and test always (every loss is measured on the same pairs)."""
        return [s for s, spec in self.files.items() if spec and (s != "train" or self.train_unit == "pairs")]

    def prepare_data(self) -> None:
        """Tokenize every split not yet cached; every split is checked before training starts."""
        for split in self.pair_splits():
            if not (path := self.cache_path(split)).exists():
                log.info("tokenizing %s split from %s (cached in %s)", split, self.files[split], path)
                build_cache(self.files[split], split, self.tokenizer, self.settings, path)
        for split in self.list_splits():
            if self.files[split] and not (path := self.list_cache_path(split)).exists():
                log.info("tokenizing %s split as groups from %s (cached in %s)", split, self.files[split], path)
                build_list_cache(self.files[split], split, self.tokenizer, self.settings, path)

    def setup(self, stage: str | None = None) -> None:
        if stage == "fit" and not self.files["train"]:
            raise DataError("data.train_file is not set")
        if stage == "fit" and not self.files["val"] and not self.val_fraction:
            raise DataError("no validation data: set data.val_file, or data.val_fraction to hold out part of train")
        if self.datasets or self.lists:
            return
        for split in self.pair_splits():
            self.datasets[split] = PairDataset(self.cache_path(split))
        for split in self.list_splits():
            if self.files[split]:
                self.lists[split] = ListDataset(self.list_cache_path(split), 2 if self.train_unit == "lists" else 1)
        self.check_kinds()
        if self.val_fraction and not self.files["val"]:
            if self.train_unit != "pairs" or self.pairs_from is not None:
                raise DataError(
                    "data.val_fraction holds out pairs, but this training data is made of rankings or ratings: pairs "
                    "of one prompt would be on both sides; give data.val_file (prompts of their own)"
                )
            train = self.datasets["train"]
            order = np.random.default_rng(self.seed).permutation(len(train))
            n_val = max(1, round(len(train) * self.val_fraction))
            self.datasets["val"] = PairDataset(train.folder, np.sort(order[:n_val]))
            self.datasets["train"] = PairDataset(train.folder, np.sort(order[n_val:]))
            log.info("data val: %d pairs held out of train (data.val_fraction=%s)", n_val, self.val_fraction)
        if self.trainer is None or self.trainer.is_global_zero:
            self.report()
            self.warn_shared_pairs()
        for split, dataset in self.datasets.items():
            if len(dataset) == 0:
                raise DataError(
                    f"data {split}: no pairs left after checking and truncation ({summary_line(dataset.meta)})"
                )
        for split, groups in self.lists.items():
            if len(groups) == 0:
                raise DataError(f"data {split}: no groups left to train on ({list_summary(groups.meta, 0, 0)})")

    def check_kinds(self) -> None:
        """What the training file holds must fit the loss and `data.pairs_from` (`groups.check_kind`)."""
        found = self.datasets["train"] if "train" in self.datasets else self.lists.get("train")
        if found is not None:
            check_kind(found.meta.get("kind", "pairs"), self.files["train"], self.train_unit, self.pairs_from)

    def warn_shared_pairs(self) -> None:
        """A validation or test pair that is also a training pair inflates held-out accuracy: say how many."""
        train = self.datasets["train"] if "train" in self.datasets else self.lists.get("train")
        for split in ("val", "test"):
            if train is not None and split in self.datasets and (n := shared_pairs(self.datasets[split], train)):
                log.warning(
                    "data %s: %d of its %d pairs are also in the training data (%s); held-out accuracy counts them",
                    split,
                    n,
                    len(self.datasets[split]),
                    self.files["train"],
                )

    def report(self) -> None:
        """Log one summary line per split and copy skipped/dropped rows to the run folder."""
        lines = []
        for split in self.files:
            if split in self.datasets and (self.datasets[split].meta["split"] == split):
                log.info(summary_line(self.datasets[split].meta))
                text = (self.datasets[split].folder / "bad_rows.jsonl").read_text(encoding="utf-8")
                lines += text.split("\n")[:-1]  # not splitlines(): rows may hold U+2028 or U+0085
        for split, groups in self.lists.items():
            groups.log_summary(self.batch_size if split == "train" else None)
            lines += (groups.folder / "bad_rows.jsonl").read_text(encoding="utf-8").split("\n")[:-1]
        if lines and self.report_dir is not None:
            self.report_dir.mkdir(parents=True, exist_ok=True)
            (self.report_dir / "bad_rows.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
            log.info("%d skipped or dropped rows listed in %s", len(lines), self.report_dir / "bad_rows.jsonl")

    def _rank(self) -> tuple[int, int]:
        return (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        """Training batches are shuffled and length-grouped; evaluation batches sorted by length."""
        rank, world = self._rank()
        as_lists = shuffle and self.train_unit != "pairs"
        dataset = self.lists[split] if as_lists else self.datasets[split]
        key, batch_size = (
            ("data.batch_size", self.batch_size) if shuffle else ("data.eval_batch_size", self.eval_batch_size)
        )
        sampler = LengthGroupedBatchSampler(
            dataset.lengths,
            batch_size,
            shuffle,
            self.group_by_length,
            self.group_batches,
            self.seed,
            rank,
            world,
            key,
            max_tokens=self.max_tokens_per_batch if shuffle else self.eval_max_tokens,
            sizes=dataset.sizes if as_lists else None,
        )
        options = dict(
            batch_sampler=sampler,
            collate_fn=self.list_collator if as_lists else self.collator,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            # its own generator: starting an iterator draws a seed, which must not move the global one
            # (dropout) and so make a resumed run differ from an uninterrupted one
            generator=torch.Generator().manual_seed(self.seed),
        )
        if shuffle:
            self.train_sampler = sampler
        if shuffle and self.resume is not None:
            self._resume(sampler)
        return DataLoader(dataset, **options)

    def state_dict(self) -> dict[str, int]:
        """The training data position, saved in every checkpoint. Lightning's own route (a stateful
        DataLoader) is not taken: it loads the position only after the loader has been built."""
        if self.trainer is None or not (self.has("train") or "train" in self.lists):
            return {}
        loop = self.trainer.fit_loop
        # Saved after an epoch ended (max_steps on its last batch), the batch count is the finished epoch's.
        started = loop.epoch_progress.current.started > loop.epoch_progress.current.completed
        return {
            "epoch": self.trainer.current_epoch,
            "batches_trained": loop.epoch_loop.batch_progress.current.processed if started else 0,
            "batches_per_epoch": len(self.train_sampler)
            if self.train_sampler is not None
            else -(-len(self.datasets["train"]) // self.batch_size)
            if "train" in self.datasets
            else len(self.lists["train"]),
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Called with a checkpoint's state before the training loader is built."""
        self.resume = state or None

    def _resume(self, sampler: LengthGroupedBatchSampler) -> None:
        """Resuming mid-epoch: that epoch continues with the batches it had not trained yet, in the
        same order, instead of starting over (and training its first batches twice)."""
        state, self.resume = self.resume, None
        sampler.set_epoch(state["epoch"])  # with a token budget, each epoch has its own batch count
        if state["batches_per_epoch"] != len(sampler):
            log.warning(
                "resuming: the checkpoint's epoch had %d batches, the data now gives %d; "
                "the interrupted epoch restarts from its first batch",
                state["batches_per_epoch"],
                len(sampler),
            )
            return
        sampler.resume_at = (state["epoch"], state["batches_trained"])
        if 0 < state["batches_trained"] < len(sampler):
            log.info("resuming epoch %d after its first %d batches", state["epoch"], state["batches_trained"])

    def counts(self) -> dict[str, int]:
        """Pairs read, used, truncated, dropped and skipped per split, for the run's results (a split
        trained on as groups: its rows and responses)."""
        out: dict[str, int] = {}
        for split, dataset in [
            *self.datasets.items(),
            *((s, g) for s, g in self.lists.items() if s not in self.datasets),
        ]:
            kinds = ("read", "used", "truncated", "dropped", "skipped", "blank_lines")
            out |= {f"data/{split}/{kind}": 0 for kind in kinds}
            if dataset.meta["split"] != split:  # val held out of train: counted under train
                continue
            for key, n in dataset.meta["counts"].items():
                kind = key.split(":", 1)[0]
                out[f"data/{split}/{kind}"] = out.get(f"data/{split}/{kind}", 0) + n
        return out

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def has_test(self) -> bool:
        return bool(self.files["test"])

    def has(self, split: str) -> bool:
        return split in self.datasets

    def pairs_in(self, split: str) -> int:
        """How many pairs the split's cache holds: a batch's `index` lies in `range(pairs_in(split))`."""
        return len(self.datasets[split].margin)

    def sequences(self, split: str) -> tuple[str, np.ndarray]:
        """What a cache of per-sequence features needs: the tokenized split's key and every sequence's
        length (sequence 2j is pair j's chosen, 2j + 1 its rejected)."""
        dataset = self.datasets[split]
        return dataset.folder.name, dataset.seq_lengths.ravel()

    def ties_in(self, split: str) -> int:
        """How many of the split's pairs are ties."""
        dataset = self.datasets[split]
        return int(dataset.tie[dataset.index].sum())

    def missing_margins(self) -> dict[str, tuple[int, int]]:
        """Per split: how many of its pairs have no margin, of how many."""
        return {s: (int(np.isnan(d.margin[d.index]).sum()), len(d)) for s, d in self.datasets.items()}

    def rows_of(self, split: str, pairs: list[int]) -> str:
        """Where pairs (cache indices, as in a batch's `index`; groups' for a split read as groups) came from."""
        if split in self.lists and self.train_unit != "pairs":
            groups = self.lists[split]
            rows = sorted(int(groups.row[groups.group_offsets[g]]) + 1 for g in pairs)
            return f"the groups starting at rows {rows} (1-based) of {groups.meta['source']} ({split} split)"
        return self.datasets[split].rows_of(pairs)
