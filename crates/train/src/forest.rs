//! A bagged forest of linfa decision trees with leaf probabilities, converted into the
//! pure [`Forest`] of the artifact.
//!
//! linfa's trees keep only the majority class per leaf, so each fitted tree is copied
//! into a flat [`Tree`] and every leaf gets the share of positive training rows that
//! fall into it: the forest's score is the mean of those shares (like scikit-learn's
//! `predict_proba`), which orders drive-days finely enough to pick a threshold.

use indicatif::{ProgressBar, ProgressStyle};
use linfa::prelude::*;
use linfa::{Dataset, ParamGuard};
use linfa_ensemble::EnsembleLearnerParams;
use linfa_trees::{DecisionTree, SplitQuality, TreeNode};
use ndarray::{Array1, Array2};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::TrainError;
use waterbear_models::{Forest, Tree};

/// Forest hyper-parameters as given (unchecked); [`ParamGuard::check`] validates them.
#[derive(Debug, Clone, PartialEq)]
pub struct ForestParams(ForestValidParams);

/// Checked forest hyper-parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct ForestValidParams {
    trees: usize,
    max_depth: usize,
    min_leaf: f32,
    bootstrap_proportion: f64,
    feature_proportion: f64,
    seed: u64,
    progress: bool,
}

impl Default for ForestParams {
    fn default() -> Self {
        Self(ForestValidParams {
            trees: 40,
            max_depth: 8,
            min_leaf: 5.0,
            bootstrap_proportion: 0.6,
            feature_proportion: 0.6,
            seed: 7,
            progress: false,
        })
    }
}

impl ForestParams {
    /// Trees in the forest.
    pub fn trees(mut self, n: usize) -> Self {
        self.0.trees = n;
        self
    }
    /// Maximum depth of each tree.
    pub fn max_depth(mut self, d: usize) -> Self {
        self.0.max_depth = d;
        self
    }
    /// Minimum rows in a leaf.
    pub fn min_leaf(mut self, m: f32) -> Self {
        self.0.min_leaf = m;
        self
    }
    /// Share of the rows each tree's bootstrap sample draws.
    pub fn bootstrap_proportion(mut self, p: f64) -> Self {
        self.0.bootstrap_proportion = p;
        self
    }
    /// Share of the features each tree sees.
    pub fn feature_proportion(mut self, p: f64) -> Self {
        self.0.feature_proportion = p;
        self
    }
    /// Random seed (tree `i` uses `seed + i`).
    pub fn seed(mut self, s: u64) -> Self {
        self.0.seed = s;
        self
    }
    /// Show a progress bar while fitting.
    pub fn progress(mut self, on: bool) -> Self {
        self.0.progress = on;
        self
    }
}

impl ParamGuard for ForestParams {
    type Checked = ForestValidParams;
    type Error = TrainError;

    fn check_ref(&self) -> Result<&ForestValidParams, TrainError> {
        let p = &self.0;
        let bad = |m: String| {
            Err(TrainError::Fit {
                what: "forest",
                message: m,
            })
        };
        if p.trees == 0 {
            return bad("trees must be at least 1".into());
        }
        if p.max_depth == 0 {
            return bad("max_depth must be at least 1".into());
        }
        if p.min_leaf.is_nan() || p.min_leaf < 1.0 {
            return bad(format!("min_leaf = {} must be at least 1", p.min_leaf));
        }
        for (n, v) in [
            ("bootstrap_proportion", p.bootstrap_proportion),
            ("feature_proportion", p.feature_proportion),
        ] {
            if !(v > 0.0 && v <= 1.0) {
                return bad(format!("{n} = {v} must be in (0, 1]"));
            }
        }
        Ok(p)
    }

    fn check(self) -> Result<ForestValidParams, TrainError> {
        self.check_ref()?;
        Ok(self.0)
    }
}

impl From<linfa::Error> for TrainError {
    fn from(e: linfa::Error) -> Self {
        TrainError::Fit {
            what: "linfa model",
            message: e.to_string(),
        }
    }
}

impl Fit<Array2<f64>, Array1<usize>, TrainError> for ForestValidParams {
    type Object = Forest;

    /// Fits `trees` bagged trees (linfa-ensemble bootstrap + feature sub-sampling over
    /// linfa-trees), two at a time, and fills in leaf probabilities from the whole
    /// training set.
    fn fit(&self, ds: &DatasetBase<Array2<f64>, Array1<usize>>) -> Result<Forest, TrainError> {
        let x = ds.records();
        let y = ds.targets();
        if x.nrows() == 0 || !y.iter().any(|&c| c == 1) || !y.iter().any(|&c| c == 0) {
            return Err(TrainError::Fit {
                what: "forest",
                message: "training data needs positive and negative rows".into(),
            });
        }
        let width = x.ncols();
        let bar = if self.progress {
            let b = ProgressBar::new(self.trees as u64);
            b.set_style(
                ProgressStyle::with_template("fitting trees {bar:30} {pos}/{len} {elapsed}")
                    .expect("valid template"),
            );
            b
        } else {
            ProgressBar::hidden()
        };
        let fit_one = |i: usize| -> Result<(Tree, Vec<f64>), TrainError> {
            let tree_params = DecisionTree::params()
                .split_quality(SplitQuality::Gini)
                .max_depth(Some(self.max_depth))
                .min_weight_leaf(self.min_leaf)
                .min_weight_split(2.0 * self.min_leaf);
            let rng = ChaCha8Rng::seed_from_u64(self.seed.wrapping_add(i as u64));
            let dataset = Dataset::new(x.to_owned(), y.to_owned());
            let ens = EnsembleLearnerParams::new_fixed_rng(tree_params, rng)
                .ensemble_size(1)
                .bootstrap_proportion(self.bootstrap_proportion)
                .feature_proportion(self.feature_proportion)
                .fit(&dataset)?;
            let model = &ens.models[0];
            let feats = &ens.model_features[0];
            let mut tree = Tree {
                feature: vec![],
                split: vec![],
                left: vec![],
                right: vec![],
                value: vec![],
            };
            flatten(model.root_node(), feats, &mut tree);
            // node probabilities from every training row: the share of positive rows
            // reaching each node (leaves: the prediction; inner nodes: for reasons)
            let n = tree.feature.len();
            let mut pos = vec![0u32; n];
            let mut tot = vec![0u32; n];
            let mut row = vec![0.0; width];
            for (r, &c) in x.rows().into_iter().zip(y.iter()) {
                row.iter_mut().zip(r.iter()).for_each(|(a, b)| *a = *b);
                let mut i = 0usize;
                loop {
                    tot[i] += 1;
                    pos[i] += u32::from(c == 1);
                    if tree.left[i] == 0 {
                        break;
                    }
                    i = if row[tree.feature[i] as usize] < tree.split[i] {
                        tree.left[i] as usize
                    } else {
                        tree.right[i] as usize
                    };
                }
            }
            for i in 0..n {
                if tot[i] > 0 {
                    tree.value[i] = f64::from(pos[i]) / f64::from(tot[i]);
                }
            }
            let mut imp = vec![0.0; width];
            for (j, v) in model.feature_importance().into_iter().enumerate() {
                if v.is_finite() {
                    imp[feats[j]] += v;
                }
            }
            bar.inc(1);
            Ok((tree, imp))
        };
        let mut out: Vec<Option<FittedTree>> = (0..self.trees).map(|_| None).collect();
        std::thread::scope(|s| {
            let (even, odd): (Vec<_>, Vec<_>) =
                out.iter_mut().enumerate().partition(|(i, _)| i % 2 == 0);
            for half in [even, odd] {
                let f = &fit_one;
                s.spawn(move || {
                    for (i, slot) in half {
                        *slot = Some(f(i));
                    }
                });
            }
        });
        bar.finish_and_clear();
        let mut trees = Vec::with_capacity(self.trees);
        let mut importance = vec![0.0; width];
        for r in out {
            let (t, imp) = r.expect("every tree fitted")?;
            trees.push(t);
            importance.iter_mut().zip(imp).for_each(|(a, b)| *a += b);
        }
        let total: f64 = importance.iter().sum();
        if total > 0.0 {
            importance.iter_mut().for_each(|v| *v /= total);
        }
        Ok(Forest { trees, importance })
    }
}

/// A fitted tree and its per-feature importance, or why it failed.
type FittedTree = Result<(Tree, Vec<f64>), TrainError>;

fn flatten(node: &TreeNode<f64, usize>, feats: &[usize], t: &mut Tree) -> u32 {
    let i = t.feature.len();
    t.feature.push(0);
    t.split.push(0.0);
    t.left.push(0);
    t.right.push(0);
    t.value.push(
        node.prediction()
            .map_or(0.0, |c| if c == 1 { 1.0 } else { 0.0 }),
    );
    if !node.is_leaf() {
        let (f, split, _) = node.split();
        let ch = node.children();
        // linfa never leaves one child empty; a node that did would stay a leaf
        if let (Some(l), Some(r)) = (ch[0].as_deref(), ch[1].as_deref()) {
            {
                let li = flatten(l, feats, t);
                let ri = flatten(r, feats, t);
                t.feature[i] = feats[f] as u32;
                t.split[i] = split;
                t.left[i] = li;
                t.right[i] = ri;
                t.value[i] = 0.0;
            }
        }
    }
    i as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forest_separates_a_threshold_concept_and_scores_in_unit_interval() {
        // y = 1 when x0 > 0.7, x1 is noise
        let n = 2000;
        let mut x = Array2::zeros((n, 2));
        let mut y = Array1::zeros(n);
        for i in 0..n {
            let a = (i as f64 * 0.618_034) % 1.0;
            let b = (i as f64 * 0.414_214) % 1.0;
            x[[i, 0]] = a;
            x[[i, 1]] = b;
            y[i] = usize::from(a > 0.7);
        }
        let f = ForestParams::default()
            .trees(24)
            .max_depth(4)
            .feature_proportion(1.0)
            .check()
            .unwrap()
            .fit(&Dataset::new(x, y))
            .unwrap();
        assert_eq!(f.trees.len(), 24);
        // linfa-ensemble draws each tree's features with replacement, so some trees
        // see only the noise column: the mean is pulled towards the base rate (0.3)
        assert!(f.score(&[0.9, 0.5]) > 0.6, "{}", f.score(&[0.9, 0.5]));
        assert!(f.score(&[0.2, 0.5]) < 0.2, "{}", f.score(&[0.2, 0.5]));
        assert!(f.importance[0] > f.importance[1]);
        assert!(ForestParams::default().trees(0).check().is_err());
    }
}
