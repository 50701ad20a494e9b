"""Image-text-mask data for vision-language segmentation models (CLIPSeg, CRIS ...).

Two layouts (registered formats, :mod:`vlprompt.data.formats`) are read into lists of
:class:`SegmentationSample` per split:

- TuneVLSeg's (Adhikari et al., ACCV 2024; github naamiinepal/tunevlseg): ``root/images/``,
  ``root/masks/`` and ``root/anns/{train,val,test}.json``, each a list of
  ``{"img_name", "mask_name", "prompts": {"p0": ..., "p1": ...}}`` with binary masks
  (:func:`~vlprompt.data.formats.tunevlseg.read_tunevlseg`);
- VOC-style multi-class palette masks (``JPEGImages/<id>.jpg``, ``SegmentationClass/<id>.png``,
  ``ImageSets/Segmentation/<split>.txt``), binarised per class: one sample per (image, class
  present), the class name as prompt (:func:`~vlprompt.data.formats.voc.read_voc`).

Modules: ``samples`` (the sample type and shared layout checks), ``masks`` (mask files),
``dataset`` (:class:`SegmentationDataset`: loads, checks and transforms image and mask together
with albumentations; :func:`collate_segmentation`), ``datamodule`` (:class:`SegmentationDataModule`).

Decisions (read these before writing a loss or a metric):

- **Targets and void.** ``mask`` is a float ``{0, 1}`` tensor. VOC's void/boundary pixels (255) are
  0 in ``mask`` and True in a separate boolean ``ignore`` tensor; losses and metrics drop those
  pixels. ``ignore`` is in the item whenever the dataset holds any palette-mask sample (all False
  for a binary-mask sample then) or the item's own mask has void pixels, and absent for purely
  binary data (:func:`collate_segmentation` gives the items of a batch that lack it an all-False one).
- **Reading a binary (TuneVLSeg) mask** (:func:`read_binary_mask`): a grayscale mask holds
  ``{0, 1}`` or ``{0, 255}``, 255 the object. In a palette (``P``) mask the values are indices: 255
  is the object when the palette paints it white (a 0/255 mask saved with a grey palette) and VOC's
  void band, ignored, when it paints it VOC's void colour (224, 224, 192); any other colour is
  refused. A mask with an alpha channel is read from its alpha channel when the alpha varies and
  the colour does not (the mask drawn in transparency only); when both vary they must mark the
  same pixels. A value set that fits neither is refused, naming the file.
- **Sizes** of every image and its mask are compared when the data is read (from the files'
  headers, nothing decoded), so a mismatch fails before training instead of mid-epoch.
- **Prompts.** Evaluation always uses a sample's first prompt (deterministic). Training draws one
  of its prompts at random for every load. ``prompt_index`` keeps the prompts of one key
  (``p<i>``), as TuneVLSeg's does; where TuneVLSeg's random mode (``-1``) draws among ``p1, p2 ...``
  at every split, vlprompt draws among a sample's non-empty prompts in training only.
- **Interpolation.** The image is resized with the backbone's interpolation (bicubic by default)
  when enlarged and by pixel-area averaging when shrunk (cv2 has no anti-aliasing flag; area
  averaging is its anti-aliased downscale, as torchvision's ``antialias=True`` is for open_clip);
  the mask is always resized with nearest neighbour, so it stays binary and void stays void.
- **Geometry.** Images are resized to ``size`` without keeping the aspect ratio (as TuneVLSeg and
  CLIPSeg do) and never centre-cropped: a crop would cut away mask pixels the metrics need.
  ``orig_size`` lets a method resize its prediction back.
- **Augmentation** is applied to the training split only, never to val/test (TuneVLSeg's configs
  allow any transform per split; vlprompt fixes this on purpose). It is a random resized crop
  and, where prompts cannot name a side, a horizontal flip.
"""

from vlprompt.data.lazy import lazy_exports

_EXPORTS = {
    "SEGMENTATION_SPLITS": "vlprompt.data.segmentation.samples",
    "VOC_CLASSNAMES": "vlprompt.data.segmentation.samples",
    "VOC_VOID_COLOUR": "vlprompt.data.segmentation.samples",
    "VOID_INDEX": "vlprompt.data.segmentation.samples",
    "SegmentationData": "vlprompt.data.segmentation.samples",
    "SegmentationSample": "vlprompt.data.segmentation.samples",
    "read_binary_mask": "vlprompt.data.segmentation.masks",
    "read_index_mask": "vlprompt.data.segmentation.masks",
    "SegmentationDataset": "vlprompt.data.segmentation.dataset",
    "collate_segmentation": "vlprompt.data.segmentation.dataset",
    "SegmentationDataModule": "vlprompt.data.segmentation.datamodule",
    "SegmentationFormat": "vlprompt.data.segmentation.datamodule",
    "read_tunevlseg": "vlprompt.data.formats.tunevlseg",
    "read_voc": "vlprompt.data.formats.voc",
}
__all__ = [
    "SEGMENTATION_SPLITS",
    "VOC_CLASSNAMES",
    "VOC_VOID_COLOUR",
    "VOID_INDEX",
    "SegmentationData",
    "SegmentationDataModule",
    "SegmentationDataset",
    "SegmentationFormat",
    "SegmentationSample",
    "collate_segmentation",
    "read_binary_mask",
    "read_index_mask",
    "read_tunevlseg",
    "read_voc",
]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
