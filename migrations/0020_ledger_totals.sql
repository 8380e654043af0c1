-- The ledger's running totals per month (issue 22). With a monthly budget set, every reply
-- asks how much of it is spent (the degrade ladder), and so does every paid write (the alert):
-- a sum over all the month's ledger rows, three or four a reply, which grows all month. At
-- 150,000 rows it took 40 to 50 ms a reply. These totals are kept by the ledger's own triggers,
-- in the statement that writes or changes its rows, so they are always exactly the sums of the
-- rows that count (status <> 'released'), whatever process or statement wrote them; a check
-- reads a few rows of them.
--
-- One row per month, kind, persona ('' for rows of none) and whether the unit price is above
-- zero (the GPU-seconds cap counts paid backends only). Sums per user and per server stay on
-- the ledger, where their indexes keep them to that user's or server's rows.
CREATE TABLE ledger_totals (
    month   date NOT NULL,
    kind    text NOT NULL,
    persona text NOT NULL,
    paid    boolean NOT NULL,
    cost    numeric NOT NULL,
    units   numeric NOT NULL,
    PRIMARY KEY (month, kind, persona, paid)
);

-- Once per statement, with all the rows it wrote or changed; the totals it touches are upserted
-- in key order, so that statements of concurrent transactions lock them in the same order.
CREATE FUNCTION ledger_totals_add() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO ledger_totals AS t (month, kind, persona, paid, cost, units)
        SELECT month, kind, coalesce(persona, ''), unit_price > 0, sum(cost), sum(units)
        FROM added WHERE status <> 'released'
        GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4
    ON CONFLICT (month, kind, persona, paid)
        DO UPDATE SET cost = t.cost + excluded.cost, units = t.units + excluded.units;
    RETURN NULL;
END
$$;

CREATE FUNCTION ledger_totals_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO ledger_totals AS t (month, kind, persona, paid, cost, units)
        SELECT month, kind, persona, paid, sum(cost), sum(units) FROM (
            SELECT month, kind, coalesce(persona, '') AS persona, unit_price > 0 AS paid,
                   cost, units
            FROM changed WHERE status <> 'released'
            UNION ALL
            SELECT month, kind, coalesce(persona, ''), unit_price > 0, -cost, -units
            FROM was WHERE status <> 'released'
        ) AS delta
        GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4
    ON CONFLICT (month, kind, persona, paid)
        DO UPDATE SET cost = t.cost + excluded.cost, units = t.units + excluded.units;
    RETURN NULL;
END
$$;

-- Rows are never deleted (ledger_append_only), so inserts and updates are all there is.
CREATE TRIGGER ledger_totals_add AFTER INSERT ON ledger
    REFERENCING NEW TABLE AS added FOR EACH STATEMENT EXECUTE FUNCTION ledger_totals_add();
CREATE TRIGGER ledger_totals_change AFTER UPDATE ON ledger
    REFERENCING OLD TABLE AS was NEW TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_totals_change();

-- The rows already written. The triggers above hold a lock on the ledger that keeps other
-- writers out until this migration commits, so nothing is counted twice or missed.
INSERT INTO ledger_totals (month, kind, persona, paid, cost, units)
    SELECT month, kind, coalesce(persona, ''), unit_price > 0, sum(cost), sum(units)
    FROM ledger WHERE status <> 'released'
    GROUP BY 1, 2, 3, 4;
