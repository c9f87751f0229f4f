"""`attnseg bench toy`: the method measured in the toy world, against exact ground truth.

Everything runs on scenes rendered by `attnseg toy render` (exact labels) and on a model
trained on other renders (`--model toy`, the shipped one, by default):

1. **Trivial baselines** on the test set: all background; a colour threshold with the image-level
   labels (pixels far from the image's median colour are foreground; with several classes, each
   foreground component gets one, largest component first). The threshold is tuned on the
   validation set.
2. **Labeller tuning** (validation set only): the noise levels real images are put through the
   UNet at, chosen for the default preset.
3. **Pseudo-masks per preset** on the test set at those noise levels: mIoU, mean and spread
   over `seeds` (each seed draws the labeller's noise); the preset's own mask constants.
4. **Threshold tuned**: the default preset with its background threshold chosen on the
   validation set (no ignore band), as a recipe tuned for this model would be;
5. **Localisation**: in two-object test scenes, how often each class word's map peaks on its
   own object, at the preset's layers and at the layer choice (`layer_candidates`) that
   localises best on the validation set, with the pseudo-masks' mIoU at that choice; the same
   for the model's cross-attention heads chosen on validation (`head_candidates`); and in
   test scenes with two or more objects, how often the preset's maps and the model's own
   noise-prediction error per one-word caption name each object pixel's class (`which_object`);
6. **Downstream** (`downstream_images` > 0): a segmenter trained only on images the model
   generates with their pseudo-masks (`attnseg synth`, default preset), against the same
   segmenter trained on as many rendered scenes with exact labels (the upper bound), both
   scored on the test set; one synthesis and training seed per entry of `seeds`. Between the
   two, the same rendered scenes with the model's pseudo-masks (the real-image labeller of 2,
   default preset) in place of their exact labels: what the masks alone cost, apart from
   the synthetic images.
7. **Ablations** of the method's three techniques, downstream, at the same image budget and
   training as 6 (paired by seed): each reliability-aware loss against plain CE on the same
   synthetic data (`losses`); the plain prompts against the toy templates with the class word
   only, against the augmented set of `attnseg prompts` (synonyms and hyponyms) and against
   that set with prompts naming several classes (`prompt_arms`); on the target domain,
   synthesis without and with a LoRA trained by `attnseg lora train` on unlabelled
   target-domain renders (`lora_images` > 0), scored on a target-domain test set,
   beside the exact-label bounds of both domains;
8. **Scaling** (`scaling_images`): downstream mIoU against the number of synthetic images,
   with the exact-label segmenter at the same counts (`scaling_seeds` seeds each).

Validation and test sets are rendered from their own seeds (`val_seed`, `test_seed`), apart
from the training scenes of the model (`ToyModelConfig.render_seed`). Results: OUT.json and
OUT.md; rendered sets live in the work folder (OUT.work) and are reused.
"""
