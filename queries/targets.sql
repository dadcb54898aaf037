-- name: TargetUpsert :exec
-- The processor writes its configured targets at start; settings holds the
-- non-secret part of the config for operators to read.
INSERT INTO stagesync.targets (name, base_url, item_path, update_method, settings)
VALUES (@name, @base_url, @item_path, @update_method, @settings)
ON CONFLICT (name) DO UPDATE
SET base_url = EXCLUDED.base_url,
    item_path = EXCLUDED.item_path,
    update_method = EXCLUDED.update_method,
    settings = EXCLUDED.settings;
