-- The model folders each worker can load (not only those it has loaded), so a submit for a
-- model no online worker has is refused with NOT_FOUND instead of failing later.
ALTER TABLE workers ADD COLUMN available text[] NOT NULL DEFAULT '{}';
