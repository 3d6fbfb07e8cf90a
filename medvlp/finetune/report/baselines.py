"""Fact-level baselines of the report table and the sentence template they (and the oracle) write through.

    targets = fact_targets(split)                              # composition + facts parsed from the split's reports
    reg = MeanFeatureRegressor().fit(train, val)               # ridge / logistic on the bag-mean feature
    mil = AttentionMIL(feat_dim, seed=0).fit(train, val)       # one gated-attention pooling head, same facts
    texts = [fact_report(p, diag_text) for p in reg.predict(test)]
    oracle = [fact_report(p, diag_text) for p in truth_facts(test)]   # the metric's ceiling

* **Template** (`fact_report`): one fixed sentence per stated fact, in the corpus's words: composition rounded like
  the references (5 % steps, 1 % steps under 5 %), then for a carcinoma the region, foci + size, grade, mitoses and
  margin, then "Final diagnosis: X." (X = the class's most common diagnosis phrase in the training reports).
* **Mean-feature regressor**: the bag-mean patch feature (standardised); ridge regression of the four tissue
  fractions and of size, mitoses and margin distance; logistic regression of the diagnosis, region, foci count,
  grade and margin status. Facts that only carcinomas have are fitted on the training carcinomas and stated only
  when the predicted diagnosis is carcinoma. alpha and C are picked per target on the validation split.
* **Attention-MIL twin**: the same patches with the same position encoding as the resampler
  (`resampler.coord_features`), one gated attention pooling (Ilse et al. 2018) into one slide vector, a linear head
  per fact (cross-entropy for categories, squared error for fractions and counts), trained on the same facts;
  its steps picked on the validation loss.
* **Oracle**: the ground truth (true composition, facts parsed from the reference) through the template.
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from medvlp.finetune.report.data import SlideSplit
from medvlp.finetune.report.resampler import coord_features
from medvlp.finetune.report.text import DIAGNOSIS_RE, REGIONS, parse_facts

CATEGORICAL = {"region": REGIONS, "foci": [1, 2, 3, 4], "grade": [1, 2, 3], "margin": ["involved", "clear"]}
NUMERIC = ("size_mm", "mitoses", "margin_mm")
NUMERIC_SCALE = {"size_mm": 10.0, "mitoses": 4.0, "margin_mm": 4.0}
MALIGNANT = "carcinoma"
_COMP_SENTENCES = {"tumor": "tumor occupies {p} of the tissue", "inflammation": "inflammatory infiltrate covers {p} of "
                   "the tissue", "necrosis": "necrosis involves {p} of the tissue",
                   "normal": "normal tissue makes up {p} of the section"}
_NUM = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}
_GRADE_WORDS = {1: "well", 2: "moderately", 3: "poorly"}


def percent_text(pct: float) -> str | None:
    """The corpus's rounding: 5 % steps, 1 % steps under 5 %; None under 0.5 % (not stated)."""
    if pct < 0.5:
        return None
    if pct < 5:
        return f"about {max(1, int(round(pct)))}%"
    return f"about {int(round(pct / 5)) * 5}%"


def diagnosis_phrases(texts: list[str], class_index: np.ndarray, classes: list[str]) -> list[str]:
    """Per class, the most common phrase after "Final diagnosis:" in its training reports (else the class name)."""
    out = []
    for c, name in enumerate(classes):
        got = Counter(m.group(1).strip() for t, y in zip(texts, class_index) if y == c
                      for m in [DIAGNOSIS_RE.search(t)] if m)
        out.append(got.most_common(1)[0][0] if got else name)
    return out


def fact_report(p: dict, diagnosis_text: str) -> str:
    """One report from predicted (or true) facts: composition {tissue: percent}, diagnosis, carcinoma facts."""
    s = []
    for t in ("tumor", "inflammation", "necrosis", "normal"):
        pct = percent_text(float(p["composition"].get(t, 0.0)))
        if pct and t in _COMP_SENTENCES:
            s.append(_COMP_SENTENCES[t].format(p=pct))
    if p.get("region") is not None:
        s.append(f"the tumor is located in the {p['region']} part of the section")
    if p.get("foci") is not None:
        k, size = int(p["foci"]), int(p.get("size_mm") or 1)
        s.append(f"a single tumor focus is present, measuring {size} mm" if k == 1 else
                 f"{_NUM.get(k, str(k))} separate tumor foci are present, the largest measuring {size} mm")
    if p.get("grade") is not None:
        s.append(f"the tumor is {_GRADE_WORDS[int(p['grade'])]} differentiated (grade {int(p['grade'])})")
    if p.get("mitoses") is not None:
        m = int(p["mitoses"])
        s.append("no mitoses are identified" if m == 0 else "1 mitosis is identified" if m == 1 else
                 f"{m} mitoses are identified")
    if p.get("margin") == "involved":
        s.append("the tumor extends to the inked margin")
    elif p.get("margin") == "clear":
        s.append(f"the tumor is {max(1, int(p.get('margin_mm') or 1))} mm from the nearest inked margin")
    s.append(f"Final diagnosis: {diagnosis_text}")
    return " ".join(x[:1].upper() + x[1:] + "." for x in s)


def truth_facts(sp: SlideSplit) -> list[dict]:
    """Per slide: diagnosis index, composition {tissue: percent} (true fractions) and the reference's facts."""
    out = []
    for i, text in enumerate(sp.texts):
        f = parse_facts(text)
        f["diagnosis"] = int(sp.class_index[i])
        f["composition"] = {t: 100.0 * float(sp.composition[i][j]) for j, t in enumerate(sp.tissues)}
        out.append(f)
    return out


def _finish(pred: dict, classes: list[str]) -> dict:
    """A malignant-only fact is stated only for a predicted carcinoma; composition percent >= 0, tumour 0 else."""
    malignant = classes[pred["diagnosis"]] == MALIGNANT
    if not malignant:
        for k in list(CATEGORICAL) + list(NUMERIC):
            pred[k] = None
        pred["composition"]["tumor"] = 0.0
    else:
        pred["size_mm"] = max(1, int(round(pred["size_mm"])))
        pred["mitoses"] = max(0, int(round(pred["mitoses"])))
        pred["margin_mm"] = 0 if pred["margin"] == "involved" else max(1, int(round(pred["margin_mm"])))
        pred["composition"]["tumor"] = max(pred["composition"]["tumor"], 0.5)
    pred["composition"] = {t: max(0.0, v) for t, v in pred["composition"].items()}
    return pred


def _mean_feats(sp: SlideSplit) -> np.ndarray:
    return np.stack([f.float().mean(0).numpy() for f in sp.feats]).astype(np.float64)


class MeanFeatureRegressor:
    """Ridge + logistic regression on the bag-mean feature (module doc)."""

    ALPHAS = (0.1, 1.0, 10.0, 100.0, 1000.0)
    CS = (0.01, 0.1, 1.0, 10.0)

    def fit(self, train: SlideSplit, val: SlideSplit) -> "MeanFeatureRegressor":
        from sklearn.linear_model import LogisticRegression, Ridge
        from sklearn.preprocessing import StandardScaler

        self.classes, self.tissues = train.classes, train.tissues
        self.scaler = StandardScaler().fit(_mean_feats(train))
        Xt, Xv = self.scaler.transform(_mean_feats(train)), self.scaler.transform(_mean_feats(val))
        ft, fv = truth_facts(train), truth_facts(val)
        mal = self.classes.index(MALIGNANT) if MALIGNANT in self.classes else -1

        def pick_ridge(y_t, y_v, rows_t, rows_v):
            best = min(self.ALPHAS, key=lambda a: np.mean(np.abs(Ridge(alpha=a).fit(Xt[rows_t], y_t).predict(
                Xv[rows_v]) - y_v)) if len(rows_v) else a)
            return Ridge(alpha=best).fit(Xt[rows_t], y_t)

        def pick_logit(y_t, y_v, rows_t, rows_v):
            if len(set(y_t)) < 2:
                return _Constant(y_t[0])
            best = max(self.CS, key=lambda c: np.mean(LogisticRegression(C=c, max_iter=2000).fit(
                Xt[rows_t], y_t).predict(Xv[rows_v]) == y_v) if len(rows_v) else -c)
            return LogisticRegression(C=best, max_iter=2000).fit(Xt[rows_t], y_t)

        all_t, all_v = np.arange(len(ft)), np.arange(len(fv))
        self.models = {"diagnosis": pick_logit(np.array([f["diagnosis"] for f in ft]),
                                               np.array([f["diagnosis"] for f in fv]), all_t, all_v)}
        self.models["composition"] = pick_ridge(np.array([[f["composition"][t] for t in self.tissues] for f in ft]),
                                                np.array([[f["composition"][t] for t in self.tissues] for f in fv]),
                                                all_t, all_v)
        for k in list(CATEGORICAL) + list(NUMERIC):
            rt = np.array([i for i, f in enumerate(ft) if f["diagnosis"] == mal and f[k] is not None], dtype=int)
            rv = np.array([i for i, f in enumerate(fv) if f["diagnosis"] == mal and f[k] is not None], dtype=int)
            if k == "margin_mm":  # the distance of clear margins only
                rt = np.array([i for i in rt if ft[i]["margin"] == "clear"], dtype=int)
                rv = np.array([i for i in rv if fv[i]["margin"] == "clear"], dtype=int)
            if not len(rt):
                self.models[k] = _Constant(CATEGORICAL[k][0] if k in CATEGORICAL else 1.0)
                continue
            yt, yv = [ft[i][k] for i in rt], [fv[i][k] for i in rv]
            if k in CATEGORICAL:
                self.models[k] = pick_logit(np.array(yt, dtype=object).astype(str), np.array(yv, dtype=object).astype(
                    str), rt, rv)
            else:
                self.models[k] = pick_ridge(np.array(yt, float), np.array(yv, float), rt, rv)
        return self

    def predict(self, sp: SlideSplit) -> list[dict]:
        X = self.scaler.transform(_mean_feats(sp))
        out = [{"diagnosis": int(d)} for d in self.models["diagnosis"].predict(X)]
        comp = self.models["composition"].predict(X)
        preds = {k: self.models[k].predict(X) for k in list(CATEGORICAL) + list(NUMERIC)}
        for i, p in enumerate(out):
            p["composition"] = {t: float(comp[i][j]) for j, t in enumerate(self.tissues)}
            for k in CATEGORICAL:
                v = preds[k][i]
                p[k] = type(CATEGORICAL[k][0])(v) if not isinstance(CATEGORICAL[k][0], str) else str(v)
            for k in NUMERIC:
                p[k] = float(preds[k][i])
            _finish(p, self.classes)
        return out


class _Constant:
    def __init__(self, v) -> None:
        self.v = v

    def predict(self, X):
        return np.array([self.v] * len(X), dtype=object)


class _GatedAttentionMIL(nn.Module):
    def __init__(self, feat_dim: int, hidden: int, pos_freqs: int, n_classes: int, n_tissues: int) -> None:
        super().__init__()
        self.pos_freqs = pos_freqs
        self.embed = nn.Linear(feat_dim, hidden)
        self.pos = nn.Linear(4 * pos_freqs, hidden, bias=False) if pos_freqs else None
        self.att_v, self.att_u, self.att_w = nn.Linear(hidden, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, 1)
        self.heads = nn.ModuleDict({"diagnosis": nn.Linear(hidden, n_classes),
                                    "composition": nn.Linear(hidden, n_tissues),
                                    **{k: nn.Linear(hidden, len(v)) for k, v in CATEGORICAL.items()},
                                    **{k: nn.Linear(hidden, 1) for k in NUMERIC}})

    def forward(self, f_BND, m_BN, c_BN2) -> dict[str, torch.Tensor]:
        h = self.embed(f_BND)
        if self.pos is not None:
            h = h + self.pos(coord_features(c_BN2, m_BN, self.pos_freqs))
        h = F.relu(h)
        a = self.att_w(torch.tanh(self.att_v(h)) * torch.sigmoid(self.att_u(h))).squeeze(-1)
        a = torch.softmax(a.masked_fill(~m_BN, float("-inf")), dim=1)
        z = (a[..., None] * h).sum(1)
        return {k: head(z) for k, head in self.heads.items()}


class AttentionMIL:
    """One gated-attention pooling head trained on the report's facts (module doc)."""

    def __init__(self, feat_dim: int, seed: int = 0, hidden: int = 64, pos_freqs: int = 4, steps: int = 600,
                 lr: float = 2e-3, batch_size: int = 16, eval_every: int = 50) -> None:
        self.feat_dim, self.seed, self.hidden, self.pos_freqs = feat_dim, seed, hidden, pos_freqs
        self.steps, self.lr, self.batch_size, self.eval_every = steps, lr, batch_size, eval_every

    def _targets(self, sp: SlideSplit) -> dict[str, torch.Tensor]:
        facts = truth_facts(sp)
        t = {"diagnosis": torch.tensor([f["diagnosis"] for f in facts]),
             "composition": torch.tensor(np.asarray(sp.composition), dtype=torch.float32)}
        for k, vals in CATEGORICAL.items():
            t[k] = torch.tensor([vals.index(f[k]) if f[k] in vals else -100 for f in facts])
        for k in NUMERIC:
            ok = [f[k] is not None and (k != "margin_mm" or f["margin"] == "clear") for f in facts]
            t[k] = torch.tensor([float(f[k]) / NUMERIC_SCALE[k] if o else float("nan") for f, o in zip(facts, ok)])
        return t

    def _loss(self, out, t, idx) -> torch.Tensor:
        loss = F.cross_entropy(out["diagnosis"], t["diagnosis"][idx])
        loss = loss + 10 * F.mse_loss(torch.softmax(out["composition"], -1), t["composition"][idx])
        for k in CATEGORICAL:
            y = t[k][idx]
            if (y >= 0).any():
                loss = loss + F.cross_entropy(out[k], y, ignore_index=-100)
        for k in NUMERIC:
            y = t[k][idx]
            ok = ~torch.isnan(y)
            if ok.any():
                loss = loss + F.mse_loss(out[k].squeeze(-1)[ok], y[ok])
        return loss

    def _batch(self, sp: SlideSplit, idx):
        from medvlp.data_shards.transforms import collate_bags

        return collate_bags([sp.feats[i] for i in idx], [sp.coords[i] for i in idx])

    def fit(self, train: SlideSplit, val: SlideSplit) -> "AttentionMIL":
        self.classes, self.tissues = train.classes, train.tissues
        g = torch.Generator().manual_seed(self.seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.net = _GatedAttentionMIL(self.feat_dim, self.hidden, self.pos_freqs, len(train.classes),
                                          len(train.tissues))
        opt = torch.optim.AdamW(self.net.parameters(), lr=self.lr, weight_decay=1e-4)
        tt, tv = self._targets(train), self._targets(val)
        best, best_state = float("inf"), None
        for step in range(1, self.steps + 1):
            self.net.train()
            idx = torch.randint(0, len(train), (self.batch_size,), generator=g).tolist()
            f, m, c = self._batch(train, idx)
            loss = self._loss(self.net(f, m, c), tt, torch.tensor(idx))
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step % self.eval_every == 0 or step == self.steps:
                self.net.eval()
                with torch.no_grad():
                    vl = float(sum(self._loss(self.net(*self._batch(val, ix)), tv, torch.tensor(ix)) * len(ix)
                                   for ix in _chunks(len(val), 64)) / max(len(val), 1))
                if vl < best:
                    best, best_state = vl, {k: v.clone() for k, v in self.net.state_dict().items()}
        if best_state is not None:
            self.net.load_state_dict(best_state)
        return self

    @torch.no_grad()
    def predict(self, sp: SlideSplit) -> list[dict]:
        self.net.eval()
        out = []
        for ix in _chunks(len(sp), 64):
            o = self.net(*self._batch(sp, ix))
            comp = torch.softmax(o["composition"], -1)
            for r in range(len(ix)):
                p = {"diagnosis": int(o["diagnosis"][r].argmax()),
                     "composition": {t: 100.0 * float(comp[r, j]) for j, t in enumerate(self.tissues)}}
                for k, vals in CATEGORICAL.items():
                    p[k] = vals[int(o[k][r].argmax())]
                for k in NUMERIC:
                    p[k] = float(o[k][r, 0]) * NUMERIC_SCALE[k]
                out.append(_finish(p, self.classes))
        return out


def _chunks(n: int, size: int):
    for i in range(0, n, size):
        yield list(range(i, min(n, i + size)))


def oracle_reports(sp: SlideSplit, phrases: list[str]) -> list[str]:
    return [fact_report(f, phrases[f["diagnosis"]]) for f in truth_facts(sp)]


def reports_of(preds: list[dict], phrases: list[str]) -> list[str]:
    return [fact_report(p, phrases[p["diagnosis"]]) for p in preds]

