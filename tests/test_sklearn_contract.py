"""The scikit-learn contract beyond ``check_estimator``, as a researcher meets it: DataFrames of
codes, pipelines in a search, the global output config, pickles of a model whose ``mlp`` lives
on an accelerator.  Each test failed on the code before it."""

import copy
import pickle
import warnings

import numpy as np
import pandas as pd
import pytest
import sklearn
import torch
from sklearn.model_selection import GridSearchCV, cross_validate
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer, StandardScaler
from virtual_device import is_virtual, virtual_device

from sklearn_jsae import JacobianSparseAutoencoder, TopKSparseAutoencoder
from sklearn_jsae.model_selection import make_jacobian_sparsity_scorer, make_scoring, sparsest_within_tolerance

FAST = dict(n_components=32, k=4, max_iter=2, batch_size=64, device="cpu", random_state=0)


@pytest.fixture(scope="module")
def X():
    return np.random.default_rng(0).normal(size=(256, 8)).astype(np.float32)


@pytest.fixture(scope="module")
def df(X):
    return pd.DataFrame(X, columns=[f"f{i}" for i in range(8)])


@pytest.fixture(scope="module")
def mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 6))


@pytest.fixture(scope="module")
def framed(df, mlp):
    return JacobianSparseAutoencoder(mlp, **FAST, sparse_output=False).set_output(transform="pandas").fit(df)


# --- DataFrames of codes are decoded by name, not silently by position --------------------------


@pytest.mark.parametrize("side", ["input", "output"])
def test_reordered_code_columns_are_refused(framed, df, side):
    codes = framed.transform(df) if side == "input" else framed.transform_output(df)
    decode = framed.inverse_transform if side == "input" else framed.inverse_transform_output
    shuffled = codes[sorted(codes.columns)]  # ...0, ...1, ...10: another order, the same names
    assert list(shuffled.columns) != list(codes.columns)
    with pytest.raises(ValueError, match="X's columns hold this dictionary's latents in another order"):
        decode(shuffled)
    np.testing.assert_array_equal(decode(shuffled[list(codes.columns)]), decode(codes))  # the fix it gives


def test_renamed_code_columns_are_refused_and_unnamed_ones_decode(framed, df):
    codes = framed.transform(df)
    with pytest.raises(ValueError, match=r"with other names \('xjacobiansparseautoencoder0'"):
        framed.inverse_transform(codes.add_prefix("x"))
    # integer column names (a frame built from an array) carry no names, as in scikit-learn
    np.testing.assert_array_equal(framed.inverse_transform(pd.DataFrame(codes.to_numpy())),
                                  framed.inverse_transform(codes))


def test_the_side_saes_own_frames_of_codes_decode_through_the_pair(framed, df):
    """``jsae.input_sae_.transform`` gives the same codes under the side SAE's names: the pair decodes
    them (the name check refused them as "other names")."""
    for side, decode in ((framed.input_sae_, framed.inverse_transform),
                         (framed.output_sae_, framed.inverse_transform_output)):
        inputs = df if side is framed.input_sae_ else framed.mlp_outputs(df)
        codes = side.set_output(transform="pandas").transform(inputs)
        assert list(codes.columns)[0].startswith("topksparseautoencoder")
        np.testing.assert_allclose(decode(codes), side.inverse_transform(codes), rtol=1e-6, atol=1e-6)


def test_the_input_sae_of_a_pair_fitted_on_a_frame_knows_its_columns(framed, df):
    """``jsae.input_sae_`` reads the pair's X, but was "fitted without feature names": a frame of
    that X warned, and a frame of other columns was encoded silently."""
    side = copy.deepcopy(framed.input_sae_).set_output(transform="default")
    np.testing.assert_array_equal(side.feature_names_in_, df.columns)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        codes = side.transform(df)
    np.testing.assert_array_equal(codes, np.asarray(framed.transform(df)))
    with pytest.raises(ValueError, match="feature names should match"):
        side.transform(df.rename(columns={"f0": "g0"}))
    assert not hasattr(framed.output_sae_, "feature_names_in_")  # the MLP's outputs have no names


def test_a_frame_of_another_width_is_named_by_its_width_not_its_names(framed, df):
    codes = framed.transform(df)
    with pytest.raises(ValueError, match="X has 31 columns but the dictionary has n_components=32"):
        framed.inverse_transform(codes.iloc[:, :31])


def test_a_topk_sae_checks_the_names_of_its_codes(df):
    sae = TopKSparseAutoencoder(**FAST, sparse_output=False).set_output(transform="pandas").fit(df)
    codes = sae.transform(df)
    with pytest.raises(ValueError, match="in another order"):
        sae.inverse_transform(codes[codes.columns[::-1]])


# --- the global output config -------------------------------------------------------------------


@pytest.mark.parametrize("cls", [TopKSparseAutoencoder, JacobianSparseAutoencoder])
def test_sparse_codes_under_a_global_pandas_config_are_refused_before_training(df, cls):
    estimator = cls(**FAST)
    with sklearn.config_context(transform_output="pandas"):
        with pytest.raises(ValueError, match=r"config_context\(transform_output='pandas'\).*set sparse_output=False"):
            estimator.fit_transform(df)
    assert not hasattr(estimator, "n_features_in_")  # refused before the fit, not after it
    with sklearn.config_context(transform_output="pandas"):
        assert isinstance(cls(**FAST, sparse_output=False).fit_transform(df), pd.DataFrame)


# --- a pipeline in a search: the scorers score its JSAE step --------------------------------------


def test_scorers_score_the_jsae_step_of_a_pipeline_on_the_transformed_X(X, mlp):
    pipe = make_pipeline(StandardScaler(), JacobianSparseAutoencoder(mlp, **FAST)).fit(X)
    inner = pipe[:-1].transform(X)
    assert make_scoring()(pipe, X) == make_scoring()(pipe[-1], inner)
    scorer = make_jacobian_sparsity_scorer(scale="normalized")
    assert scorer(pipe, X) == scorer(pipe[-1], inner)


def test_scorers_score_a_frozen_jsae_alone_or_in_a_pipeline(X, mlp):
    """scikit-learn's FrozenEstimator keeps a fitted JSAE as it is in a pipeline fitted around it:
    the scorers said "a Pipeline with 0 JacobianSparseAutoencoder steps", or, for the frozen JSAE
    itself, "must be a fitted JacobianSparseAutoencoder ... Fit one first"."""
    from sklearn.frozen import FrozenEstimator

    jsae = JacobianSparseAutoencoder(mlp, **FAST).fit(X)
    pipe = make_pipeline(StandardScaler(), FrozenEstimator(jsae)).fit(X)  # the scaler refits; the JSAE not
    inner = pipe[:-1].transform(X)
    assert make_scoring()(pipe, X) == make_scoring()(jsae, inner)
    assert make_scoring()(FrozenEstimator(jsae), X) == make_scoring()(jsae, X)
    scorer = make_jacobian_sparsity_scorer(scale="normalized")
    assert scorer(FrozenEstimator(jsae), X) == scorer(jsae, X)


def test_a_search_over_a_pipeline_scores_every_candidate(X, mlp):
    pipe = make_pipeline(StandardScaler(), JacobianSparseAutoencoder(mlp, **FAST))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # "Scoring failed" is a UserWarning
        warnings.filterwarnings("ignore", category=sklearn.exceptions.ConvergenceWarning)
        search = GridSearchCV(pipe, {"jacobiansparseautoencoder__l1": [0.0, 1.0]}, cv=2,
                              scoring=make_scoring(), refit=sparsest_within_tolerance()).fit(X)
    assert np.isfinite(search.cv_results_["mean_test_neg_jacobian_sparsity"]).all()
    assert search.best_params_["jacobiansparseautoencoder__l1"] in (0.0, 1.0)
    scores = cross_validate(pipe, X, cv=2, scoring=make_jacobian_sparsity_scorer())["test_score"]
    assert np.isfinite(scores).all()


@pytest.mark.parametrize("n_jsae", [0, 2])
def test_a_pipeline_without_exactly_one_jsae_is_named(X, mlp, n_jsae):
    steps = [FunctionTransformer()] + [JacobianSparseAutoencoder(None, **FAST, sparse_output=False) for _ in range(n_jsae)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = make_pipeline(*steps).fit(X)
    with pytest.raises(TypeError, match=f"a Pipeline with {n_jsae} JacobianSparseAutoencoder steps"):
        make_scoring()(pipe, X)


def test_the_refit_rule_says_when_every_candidate_failed_to_score():
    """scikit-learn records a failed dict scorer as one NaN 'score' column: the rule said to use
    make_scoring(), which was in use."""
    results = {"mean_test_score": np.array([np.nan, np.nan]), "params": [{}, {}]}
    with pytest.raises(ValueError, match="the scoring failed on every candidate .* 'Scoring failed' warnings"):
        sparsest_within_tolerance()(results)


# --- pickles of a model whose mlp sits on an accelerator ------------------------------------------


@pytest.mark.parametrize("copier", ["pickle", "deepcopy"])
def test_a_pickled_model_carries_its_mlp_parameter_on_the_cpu(X, mlp, copier):
    """The pickle of a model whose ``mlp`` was on a GPU could not be read on a CPU-only machine
    (the virtual device stands in for CUDA here: its tensors report another device)."""
    jsae = JacobianSparseAutoencoder(mlp, **FAST).fit(X)
    with virtual_device(strict_dtype=None):
        jsae.mlp = copy.deepcopy(mlp).to("meta")
        assert is_virtual(next(jsae.mlp.parameters()))
        back = pickle.loads(pickle.dumps(jsae)) if copier == "pickle" else copy.deepcopy(jsae)
    assert all(t.device.type == "cpu" and not is_virtual(t) for t in back.mlp.parameters())
    for mine, theirs in zip(back.mlp.parameters(), mlp.parameters()):
        assert torch.equal(mine, theirs)
    assert (back.transform(X[:5]) != jsae.transform(X[:5])).nnz == 0


# --- a search sharing one checkpoint folder --------------------------------------------------------


def test_the_filter_the_warning_suggests_silences_it(tmp_path, X):
    """Every fit of a search after the first warns that the folder holds other fits' checkpoints;
    the message (and docs/long_runs.rst) give a filter, which must match it."""
    first = TopKSparseAutoencoder(**FAST, checkpoint_dir=tmp_path)
    first.fit(X)
    with pytest.warns(UserWarning, match="holds checkpoints of other fits") as caught:
        TopKSparseAutoencoder(**{**FAST, "k": 3}, checkpoint_dir=tmp_path).fit(X)
    suggested = next(str(w.message) for w in caught if "other fits" in str(w.message))
    pattern = suggested.split("filterwarnings('ignore', '")[1].split("')")[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", category=sklearn.exceptions.ConvergenceWarning)
        warnings.filterwarnings("ignore", pattern)
        TopKSparseAutoencoder(**{**FAST, "k": 2}, checkpoint_dir=tmp_path).fit(X)


def test_a_pair_fits_on_a_polars_frame_and_gives_and_decodes_polars_codes_by_name(X, mlp):
    """scikit-learn's ``set_output(transform="polars")``: the pair reads a polars frame's columns,
    returns its codes as polars frames named by latent, and decodes them by name, as for pandas."""
    import polars as pl

    frame = pl.DataFrame(X, schema=[f"f{i}" for i in range(X.shape[1])])
    jsae = JacobianSparseAutoencoder(mlp, **FAST, sparse_output=False).set_output(transform="polars").fit(frame)
    plain = JacobianSparseAutoencoder(mlp, **FAST, sparse_output=False).fit(X)
    assert list(jsae.feature_names_in_) == frame.columns == list(jsae.input_sae_.feature_names_in_)
    codes, output_codes = jsae.transform(frame), jsae.transform_output(frame)
    assert isinstance(codes, pl.DataFrame) and codes.columns == list(jsae.get_feature_names_out())
    assert output_codes.columns == list(jsae.get_output_feature_names_out())
    np.testing.assert_array_equal(codes.to_numpy(), plain.transform(X))  # the same fit as on the array
    np.testing.assert_array_equal(jsae.inverse_transform(codes), plain.inverse_transform(plain.transform(X)))
    np.testing.assert_allclose(jsae.inverse_transform_output(output_codes),
                               plain.inverse_transform_output(plain.transform_output(X)), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="with other names"):
        jsae.inverse_transform(codes.rename({name: "x" + name for name in codes.columns}))
    with pytest.raises(ValueError, match="holds output-side codes"):
        jsae.inverse_transform(output_codes)
    assert make_scoring()(jsae, frame) == make_scoring()(plain, X)
