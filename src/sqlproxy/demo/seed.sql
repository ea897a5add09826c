-- sqlproxy demo data. Deterministic (no random()): the same rows on every machine, so tests can
-- assert exact counts and values. Idempotent: re-running inserts nothing new.
--
--   customers 300 (100 eu, 200 us) · orders 3000 · order_items 7500 · employees 50
--   sensitive_records 200 · hr.payroll 50
--
-- Card numbers pass the Luhn check (the first ten are the card networks' published test
-- numbers); IBANs pass the ISO 7064 mod-97 check; SSNs are well-formed (area 100-664, group and
-- serial non-zero). None belongs to anyone.

-- Session-local helpers: pg_temp objects vanish when the loading session ends.
CREATE OR REPLACE FUNCTION pg_temp.luhn_check_digit(body text) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT ((10 - sum(CASE WHEN pos % 2 = 1
                           THEN (CASE WHEN d * 2 > 9 THEN d * 2 - 9 ELSE d * 2 END)
                           ELSE d END) % 10) % 10)::text
    FROM (SELECT substr(reverse(body), pos, 1)::int AS d, pos
          FROM generate_series(1, length(body)) AS pos) AS digits
$$;

-- Name n (any integer >= 0) of 30 first and 30 last names.
CREATE OR REPLACE FUNCTION pg_temp.first_name(n int) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT (ARRAY[
    'Alice', 'Bob', 'Carla', 'David', 'Elena', 'Farid', 'Grace', 'Hugo', 'Ines', 'Jonas',
    'Keiko', 'Liam', 'Maria', 'Noah', 'Olga', 'Pedro', 'Quinn', 'Rosa', 'Samir', 'Tara',
    'Ulrich', 'Vera', 'Wei', 'Ximena', 'Yusuf', 'Zoe', 'Amara', 'Bruno', 'Chloe', 'Dmitri'
])[1 + n % 30]
$$;

CREATE OR REPLACE FUNCTION pg_temp.last_name(n int) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT (ARRAY[
    'Smith', 'Müller', 'Garcia', 'Rossi', 'Dubois', 'Nowak', 'Johnson', 'Jensen', 'Silva', 'Kowalski',
    'Tanaka', 'Novak', 'Brown', 'Schmidt', 'Lopez', 'Moreau', 'Andersson', 'Ivanova', 'Murphy', 'Fischer',
    'Costa', 'Horvat', 'Walker', 'Bianchi', 'Leroy', 'Virtanen', 'Papadopoulos', 'Okafor', 'Chen', 'Keller'
])[1 + n % 30]
$$;

-- ASCII-only local parts for e-mail addresses.
CREATE OR REPLACE FUNCTION pg_temp.mail_part(s text) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT lower(translate(s, 'üöäéèçñ', 'uoaeecn'))
$$;

INSERT INTO public.customers (id, name, email, phone, region, created_at)
SELECT i,
       pg_temp.first_name(i - 1) || ' ' || pg_temp.last_name((i - 1) / 30 + (i - 1) * 7),
       pg_temp.mail_part(pg_temp.first_name(i - 1)) || '.'
           || pg_temp.mail_part(pg_temp.last_name((i - 1) / 30 + (i - 1) * 7)) || i || '@'
           || (ARRAY['example.com', 'example.org', 'example.net', 'mail.example.com'])[1 + i % 4],
       CASE
           WHEN i % 3 <> 0 THEN '+1 ' || (ARRAY['212', '415', '312', '617', '206'])[1 + i % 5]
                                || '-555-01' || lpad((i % 100)::text, 2, '0')
           WHEN i % 2 = 0  THEN '+44 20 7946 0' || lpad((i % 1000)::text, 3, '0')
           ELSE                 '+33 6 39 98 ' || lpad((i % 100)::text, 2, '0') || ' '
                                || lpad(((i * 7) % 100)::text, 2, '0')
       END,
       CASE WHEN i % 3 = 0 THEN 'eu' ELSE 'us' END,
       timestamptz '2024-01-01 09:00:00+00' + make_interval(days => (i * 37) % 365, mins => (i * 97) % 1440)
FROM generate_series(1, 300) AS i
ON CONFLICT (id) DO NOTHING;

-- Orders are unevenly spread: ten customers order far more than the rest, and customers 291-300
-- never order (LEFT JOIN / NOT EXISTS material).
INSERT INTO public.orders (id, customer_id, total, status, created_at)
SELECT o,
       CASE WHEN o % 4 = 0 THEN 1 + (o * 31) % 40 ELSE 1 + (o * 7919) % 290 END,
       0,
       CASE
           WHEN o % 20 = 0 THEN 'cancelled'
           WHEN o % 20 = 1 THEN 'refunded'
           WHEN o % 20 BETWEEN 2 AND 4 THEN 'pending'
           WHEN o % 20 BETWEEN 5 AND 8 THEN 'paid'
           WHEN o % 20 BETWEEN 9 AND 12 THEN 'shipped'
           ELSE 'delivered'
       END,
       timestamptz '2024-03-01 00:00:00+00' + o * interval '3 hours' + ((o * 13) % 180) * interval '1 minute'
FROM generate_series(1, 3000) AS o
ON CONFLICT (id) DO NOTHING;

-- 1 to 4 items per order, 7500 in all.
INSERT INTO public.order_items (id, order_id, product, quantity, unit_price)
SELECT row_number() OVER (ORDER BY o, k),
       o,
       p.product,
       1 + (o + k) % 5,
       p.price
FROM generate_series(1, 3000) AS o
CROSS JOIN LATERAL generate_series(1, 1 + o % 4) AS k
JOIN (VALUES
    (0, 'Mechanical keyboard', 89.00), (1, 'Wireless mouse', 24.99), (2, '27" monitor', 279.00),
    (3, 'USB-C hub', 39.50), (4, 'Laptop stand', 45.00), (5, 'Noise-cancelling headphones', 199.00),
    (6, 'Webcam HD', 59.90), (7, 'Desk lamp', 32.00), (8, 'Ergonomic chair', 349.00),
    (9, 'Standing desk', 499.00), (10, 'Cable kit', 12.49), (11, 'Portable SSD 1TB', 109.00)
) AS p(n, product, price) ON p.n = (o * 7 + k * 5) % 12
ON CONFLICT (id) DO NOTHING;

UPDATE public.orders o
SET total = s.total
FROM (SELECT order_id, sum(quantity * unit_price)::numeric(10,2) AS total
      FROM public.order_items GROUP BY order_id) AS s
WHERE s.order_id = o.id AND o.total IS DISTINCT FROM s.total;

-- 1 CEO, 5 department heads reporting to the CEO, 44 staff reporting to their head.
INSERT INTO public.employees (id, name, email, salary, department, manager_id)
SELECT e,
       pg_temp.first_name(e + 10) || ' ' || pg_temp.last_name((e - 1) * 7 + (e - 1) / 30 + 3),
       pg_temp.mail_part(pg_temp.first_name(e + 10)) || '.'
           || pg_temp.mail_part(pg_temp.last_name((e - 1) * 7 + (e - 1) / 30 + 3)) || '@corp.example.com',
       CASE
           WHEN e = 1 THEN 250000.00
           WHEN e <= 6 THEN 150000.00 + e * 1000
           ELSE 52000.00 + ((e * 7919) % 600) * 100
       END,
       CASE
           WHEN e = 1 THEN 'executive'
           ELSE (ARRAY['engineering', 'sales', 'support', 'finance', 'marketing'])[1 + (e - 2) % 5]
       END,
       CASE
           WHEN e = 1 THEN NULL
           WHEN e <= 6 THEN 1
           ELSE 2 + (e - 2) % 5
       END
FROM generate_series(1, 50) AS e
ON CONFLICT (id) DO NOTHING;

INSERT INTO public.sensitive_records (id, customer_id, ssn, card_number, card_brand, note)
SELECT r,
       r,
       lpad((100 + (r * 37) % 565)::text, 3, '0') || '-'
           || lpad((1 + (r * 13) % 99)::text, 2, '0') || '-'
           || lpad((1 + (r * 7919) % 9999)::text, 4, '0'),
       coalesce(known.card, gen.body || pg_temp.luhn_check_digit(gen.body)),
       coalesce(known.brand, gen.brand),
       CASE r % 6
           WHEN 0 THEN NULL
           WHEN 1 THEN 'Identity verified by phone'
           WHEN 2 THEN 'Prefers contact via ' || c.email
           WHEN 3 THEN 'Backup card 4242 4242 4242 4242 on file'
           WHEN 4 THEN 'Call back on ' || coalesce(c.phone, 'n/a') || ' about a chargeback'
           ELSE 'Billing address updated'
       END
FROM generate_series(1, 200) AS r
JOIN public.customers c ON c.id = r
LEFT JOIN (VALUES
    (1, '4111111111111111', 'visa'), (2, '5555555555554444', 'mastercard'),
    (3, '378282246310005', 'amex'), (4, '6011111111111117', 'discover'),
    (5, '4012888888881881', 'visa'), (6, '5105105105105100', 'mastercard'),
    (7, '4242424242424242', 'visa'), (8, '371449635398431', 'amex'),
    (9, '6011000990139424', 'discover'), (10, '3530111333300000', 'jcb')
) AS known(n, card, brand) ON known.n = r
CROSS JOIN LATERAL (
    SELECT CASE r % 3
               WHEN 0 THEN '4' || lpad(((r * 982451653::bigint) % 100000000000000)::text, 14, '0')
               WHEN 1 THEN '5' || (1 + r % 5)::text
                           || lpad(((r * 179424673::bigint) % 10000000000000)::text, 13, '0')
               ELSE '37' || lpad(((r * 15485863::bigint) % 1000000000000)::text, 12, '0')
           END AS body,
           (ARRAY['visa', 'mastercard', 'amex'])[1 + r % 3] AS brand
) AS gen
ON CONFLICT (id) DO NOTHING;

-- German IBANs: DE + mod-97 check digits + 8-digit bank code + 10-digit account.
INSERT INTO hr.payroll (employee_id, iban, bonus, last_paid_on)
SELECT e,
       'DE' || lpad((98 - mod((b.bban || '131400')::numeric, 97))::text, 2, '0') || b.bban,
       ((e * 311) % 50) * 100.00,
       date '2025-06-30'
FROM generate_series(1, 50) AS e
CROSS JOIN LATERAL (
    SELECT '37040044' || lpad(((e * 104729::bigint) % 10000000000)::text, 10, '0') AS bban
) AS b
ON CONFLICT (employee_id) DO NOTHING;

-- Explicit ids above bypass the identity sequences; move them past the data so inserts work.
SELECT setval(pg_get_serial_sequence('public.customers', 'id'), (SELECT max(id) FROM public.customers));
SELECT setval(pg_get_serial_sequence('public.orders', 'id'), (SELECT max(id) FROM public.orders));
SELECT setval(pg_get_serial_sequence('public.order_items', 'id'), (SELECT max(id) FROM public.order_items));
SELECT setval(pg_get_serial_sequence('public.employees', 'id'), (SELECT max(id) FROM public.employees));
SELECT setval(pg_get_serial_sequence('public.sensitive_records', 'id'),
              (SELECT max(id) FROM public.sensitive_records));

-- Planner statistics now, so EXPLAIN-based cost checks see real row counts from the start.
ANALYZE public.customers, public.orders, public.order_items, public.employees,
        public.sensitive_records, hr.payroll;
