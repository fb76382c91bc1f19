"""The run report: ``report.html`` plus its PNGs in ``report/`` next to it.

It shows, for every ensemble member (patch candidates -> max over patches -> top k per
query) and for the ensemble's predictions: the ISC21 metrics, PR curves, recall@1 per
transform family (when query metadata is given), the score distribution of copies vs
non-copies with the P90 threshold, and a gallery of the worst false positives and missed
copies. Inputs are tables, not a run folder, so the caller decides where they come from.
:func:`ensemble.report.build.build_report` writes it; :mod:`ensemble.report.analysis` scores
without drawing (no matplotlib).
"""
