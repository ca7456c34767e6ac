-- A batch statement that must write exactly `expected` rows aborts its transaction otherwise
-- (then every request of the batch is redone alone).
CREATE FUNCTION signet_expect_rows(expected BIGINT, actual BIGINT, what TEXT) RETURNS BIGINT
LANGUAGE plpgsql AS $$
BEGIN
    IF expected <> actual THEN
        RAISE EXCEPTION 'batch wrote % % rows, expected %', actual, what, expected
            USING ERRCODE = 'serialization_failure';
    END IF;
    RETURN actual;
END $$;
