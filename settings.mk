# Generated from pipeline/config.py by `make settings` (faceopt make-settings): do not
# edit. A make variable becomes its flag only when set, so FACEOPT_* settings still apply.
# `make help` lists the #: lines.
SETTINGS_STUDY = $(call flag,PRESET,preset) \
	$(call flag,DATA,data) \
	$(call flag,SIZE,input-size) \
	$(call flag,COLOUR,colour) \
	$(call flag,FEATURES,features) \
	$(call flag,DESCRIPTOR,descriptor) \
	$(call flag,STORAGE,storage) \
	$(call flag,STUDY,study) \
	$(call flag,SEED,seed)
SETTINGS_TUNE = $(if $(SKIP_BAD_ROWS),--skip-bad-rows) \
	$(call flag,N_TRIALS,n-trials) \
	$(call flag,TIMEOUT,timeout) \
	$(call flag,EPOCHS,epochs) \
	$(call flag,SPACE,space) \
	$(call flag,METRIC,metric) \
	$(call flag,SAMPLER,sampler) \
	$(call flag,SAMPLER_ARGS,sampler-args) \
	$(call flag,ENQUEUE,enqueue) \
	$(call flag,PRUNER,pruner) \
	$(call flag,N_JOBS,n-jobs) \
	$(call flag,WORKERS,workers)
SETTINGS_TRAIN = $(call flag,PRECISION,precision)
SETTINGS_TRAIN_BEST = $(call flag,TRAIN_EPOCHS,epochs) \
	$(call flag,PATIENCE,patience) \
	$(call flag,ENSEMBLE,ensemble) \
	$(call flag,MODEL_NAME,model-name)
SETTINGS_SERVE = $(call flag,MODEL_NAME,model-name) \
	$(call flag,HOST,host) \
	$(call flag,PORT,port) \
	$(call flag,WORKERS,workers) \
	$(call flag,MAX_BATCH,max-batch)
SETTINGS_EVALUATE = $(call flag,MODEL_NAME,model-name) \
	$(call flag,MIN_FACE,min-face)
#: PRESET         auto, cpu, gpu, seed: budgets and recipe (PRESETS in pipeline/config.py); auto: this machine's preset from its known good points; seed: the original experiment
#: DATA           age_gender.csv(.gz) or a UTKFace folder (default data/age_gender.csv)
#: SIZE           side of the face in pixels (a UTKFace folder; CSV: 48) (default 48)
#: COLOUR         gray, rgb: the face's colour (a folder) (default gray)
#: FEATURES       pixels, descriptor, both, search: the pixels, pretrained face features, both, or the trial chooses (search) (default pixels)
#: DESCRIPTOR     dlib-stages, dlib128: which face features: each level of dlib's face network, or its 128-D descriptor (default dlib-stages)
#: STORAGE        Optuna storage URL (default sqlite:///optuna.db)
#: STUDY          study name (also the MLflow experiment) (default faceopt)
#: SEED           seed of the split and of every trial (default 42)
#: SKIP_BAD_ROWS  report and skip malformed rows instead of stopping
#: N_TRIALS       trials to add to the study (default 20)
#: TIMEOUT        stop starting trials after this many seconds
#: EPOCHS         epochs per trial (default 10)
#: SPACE          mlp, cnn, cnn-cpu: search space (default mlp)
#: METRIC         age, ethnicity, gender, mean: validation accuracy to maximise (default age)
#: SAMPLER        tpe, random, skopt, gp, cmaes, qmc: the study's sampler (default tpe)
#: SAMPLER_ARGS   JSON of sampler arguments, e.g. '{"base_estimator": "ET", "acq_func_kwargs": {"xi": 0.02}}'
#: ENQUEUE        JSON file of trial params (an object or a list) to try first, e.g. recipes/cpu.json
#: PRUNER         median, hyperband, successive-halving, percentile, none: per-epoch pruning (default median)
#: N_JOBS         trials in parallel threads within this process (default 1)
#: WORKERS        tuning processes on the study, or auto (one per GPU) (default 1); server processes (default 1)
#: PRECISION      auto, fp32, bf16, fp16: training's autocast precision (auto: bf16 on GPUs that have it, else fp16, and on CPUs with native bf16, else fp32) (default auto)
#: TRAIN_EPOCHS   most epochs to train (early stopping may end sooner) (default 50)
#: PATIENCE       epochs without a better validation metric before stopping (default 5)
#: ENSEMBLE       networks trained from seeds seed, seed + 1, ..., served as one (their mean logits) (default 1)
#: MODEL_NAME     the registered model (default faceopt)
#: HOST           address the service binds (default 127.0.0.1)
#: PORT           the service's port (default 8000)
#: MAX_BATCH      most faces per pass shared by requests (default 64)
#: MIN_FACE       the smallest face looked for (of the shorter side) (default 0.15)
