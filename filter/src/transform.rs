//! JMESPath expressions (mappings and invariants) with the registry's functions:
//! `to_minor(amount, currency)`, `minor_units(currency)`, `is_currency(code)`.
//!
//! Cost: the expressions come from the operator's registry, not the request; each projects or
//! filters the payload a fixed number of times, so evaluation is linear in the payload for a
//! given registry (the built-in mappings: `benches/worst_case.rs`, 16 tool calls of 64 KB).

use std::rc::Rc;
use std::sync::Arc;

use jmespath::ast::Ast;
use jmespath::functions::{ArgumentType, CustomFunction, Signature};
use jmespath::{Context, ErrorReason, JmespathError, Rcvar, Runtime, Variable};
use serde_json::Value;

use crate::money::{to_minor, CurrencyTable};

/// A JMESPath runtime: the standard functions plus the registry's.
pub struct Engine {
    runtime: Runtime,
}

/// A parsed expression whose functions all exist.
#[derive(Debug, Clone)]
pub struct Expression {
    source: String,
    ast: Ast,
}

impl Expression {
    pub fn as_str(&self) -> &str {
        &self.source
    }
}

impl Engine {
    pub fn new(currencies: Arc<CurrencyTable>) -> Self {
        let mut runtime = Runtime::new();
        runtime.register_builtin_functions();
        register_money_functions(&mut runtime, currencies);
        Self { runtime }
    }

    /// Parses `source` and checks that every function it calls is known (JMESPath itself would
    /// only notice at evaluation time, on the first request).
    pub fn compile(&self, source: &str) -> Result<Expression, String> {
        let ast = jmespath::parse(source).map_err(|e| one_line(&e))?;
        let mut stack = vec![&ast];
        while let Some(node) = stack.pop() {
            if let Ast::Function { name, .. } = node {
                if self.runtime.get_function(name).is_none() {
                    return Err(format!("unknown function {name}()"));
                }
            }
            push_children(node, &mut stack);
        }
        Ok(Expression {
            source: source.to_owned(),
            ast,
        })
    }

    pub fn evaluate(&self, expression: &Expression, data: &Value) -> Result<Value, String> {
        to_json(&self.evaluate_on(expression, &Input::new(data)?)?)
    }

    /// Evaluates on data converted once by [`Input::new`]: several expressions over the same
    /// payload (its invariants and its mapping) share one conversion.
    pub fn evaluate_on(&self, expression: &Expression, input: &Input) -> Result<Rcvar, String> {
        let mut ctx = Context::new(&expression.source, &self.runtime);
        jmespath::interpret(&input.0, &expression.ast, &mut ctx).map_err(|e| one_line(&e))
    }

    /// Whether `expression` yields `true` on `input` (an invariant).
    pub fn holds(&self, expression: &Expression, input: &Input) -> Result<bool, String> {
        Ok(matches!(
            *self.evaluate_on(expression, input)?,
            Variable::Bool(true)
        ))
    }
}

/// A JSON value as JMESPath data. Converting copies the whole value (strings included), which
/// costs as much as evaluating a simple expression: build it once per value.
pub struct Input(Rcvar);

impl Input {
    pub fn new(data: &Value) -> Result<Self, String> {
        Ok(Input(Rc::new(
            Variable::try_from(data).map_err(|e| one_line(&e))?,
        )))
    }
}

/// The result of [`Engine::evaluate_on`] as JSON.
pub fn to_json(result: &Rcvar) -> Result<Value, String> {
    serde_json::to_value(&**result).map_err(|e| e.to_string())
}

/// JMESPath errors print the expression with a caret over several lines; keep one line.
fn one_line(err: &JmespathError) -> String {
    match &err.reason {
        // our functions report their own sentence as a "parse" reason (the only free-text one)
        ErrorReason::Parse(message) if err.offset > 0 || !err.expression.is_empty() => {
            format!("{message} (at offset {})", err.offset)
        }
        reason => reason.to_string(),
    }
}

fn push_children<'a>(node: &'a Ast, stack: &mut Vec<&'a Ast>) {
    match node {
        Ast::Comparison { lhs, rhs, .. }
        | Ast::Projection { lhs, rhs, .. }
        | Ast::And { lhs, rhs, .. }
        | Ast::Or { lhs, rhs, .. }
        | Ast::Subexpr { lhs, rhs, .. } => {
            stack.push(lhs);
            stack.push(rhs);
        }
        Ast::Condition {
            predicate, then, ..
        } => {
            stack.push(predicate);
            stack.push(then);
        }
        Ast::Expref { ast: node, .. }
        | Ast::Flatten { node, .. }
        | Ast::Not { node, .. }
        | Ast::ObjectValues { node, .. } => stack.push(node),
        Ast::Function { args, .. } | Ast::MultiList { elements: args, .. } => stack.extend(args),
        Ast::MultiHash { elements, .. } => stack.extend(elements.iter().map(|kv| &kv.value)),
        Ast::Identity { .. }
        | Ast::Field { .. }
        | Ast::Index { .. }
        | Ast::Literal { .. }
        | Ast::Slice { .. } => {}
    }
}

fn function_error(ctx: &Context<'_>, message: String) -> JmespathError {
    JmespathError::from_ctx(ctx, ErrorReason::Parse(message))
}

fn register_money_functions(runtime: &mut Runtime, currencies: Arc<CurrencyTable>) {
    let table = Arc::clone(&currencies);
    runtime.register_function(
        "to_minor",
        Box::new(CustomFunction::new(
            Signature::new(
                vec![
                    ArgumentType::Union(vec![ArgumentType::Number, ArgumentType::String]),
                    ArgumentType::String,
                ],
                None,
            ),
            Box::new(move |args: &[Rcvar], ctx: &mut Context<'_>| {
                let (Some(amount), Some(currency)) = (args.first(), args.get(1)) else {
                    return Err(function_error(ctx, "to_minor needs two arguments".into()));
                };
                let amount_text = match &**amount {
                    Variable::Number(n) => n.to_string(),
                    Variable::String(s) => s.clone(),
                    _ => {
                        return Err(function_error(
                            ctx,
                            "to_minor: amount must be a number".into(),
                        ))
                    }
                };
                let code = currency.as_string().map(String::as_str).unwrap_or_default();
                let units = table.minor_units(code).ok_or_else(|| {
                    function_error(ctx, format!("to_minor: unknown currency {code:?}"))
                })?;
                let minor = to_minor(&amount_text, units)
                    .map_err(|e| function_error(ctx, format!("to_minor: {e}")))?;
                Ok(Rc::new(Variable::Number(minor.into())))
            }),
        )),
    );

    let table = Arc::clone(&currencies);
    runtime.register_function(
        "minor_units",
        Box::new(CustomFunction::new(
            Signature::new(vec![ArgumentType::String], None),
            Box::new(move |args: &[Rcvar], ctx: &mut Context<'_>| {
                let code = args
                    .first()
                    .and_then(|a| a.as_string().cloned())
                    .unwrap_or_default();
                let units = table.minor_units(&code).ok_or_else(|| {
                    function_error(ctx, format!("minor_units: unknown currency {code:?}"))
                })?;
                Ok(Rc::new(Variable::Number(units.into())))
            }),
        )),
    );

    runtime.register_function(
        "is_currency",
        Box::new(CustomFunction::new(
            Signature::new(vec![ArgumentType::Any], None),
            Box::new(move |args: &[Rcvar], _ctx: &mut Context<'_>| {
                let known = args
                    .first()
                    .and_then(|a| a.as_string())
                    .is_some_and(|code| currencies.contains(code));
                Ok(Rc::new(Variable::Bool(known)))
            }),
        )),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn engine() -> Engine {
        Engine::new(Arc::new(CurrencyTable::iso4217().unwrap()))
    }

    #[test]
    fn maps_with_to_minor() {
        let e = engine();
        let expr = e
            .compile("{id: invoice_id, amount_minor: to_minor(amount, currency), customer: {name: customer_name}}")
            .unwrap();
        let out = e
            .evaluate(&expr, &json!({"invoice_id":"INV-1","amount":0.29,"currency":"USD","customer_name":"Acme"}))
            .unwrap();
        assert_eq!(
            out,
            json!({"id":"INV-1","amount_minor":29,"customer":{"name":"Acme"}})
        );
        let jpy = e
            .evaluate(&expr, &json!({"amount":"1500","currency":"JPY"}))
            .unwrap();
        assert_eq!(jpy["amount_minor"], json!(1500));
    }

    #[test]
    fn function_errors_are_readable_sentences() {
        let e = engine();
        let expr = e.compile("to_minor(amount, currency)").unwrap();
        let err = e
            .evaluate(&expr, &json!({"amount":1.005,"currency":"USD"}))
            .unwrap_err();
        assert!(
            err.starts_with("to_minor: 1.005 has more than 2 decimal"),
            "{err}"
        );
        let err = e
            .evaluate(&expr, &json!({"amount":1,"currency":"ZZZ"}))
            .unwrap_err();
        assert!(err.contains("unknown currency \"ZZZ\""), "{err}");
        assert!(e
            .evaluate(&expr, &json!({"amount":true,"currency":"USD"}))
            .is_err());
    }

    #[test]
    fn predicates_for_invariants() {
        let e = engine();
        let check = e.compile("amount >= `0` && is_currency(currency)").unwrap();
        assert_eq!(
            e.evaluate(&check, &json!({"amount":1,"currency":"EUR"}))
                .unwrap(),
            json!(true)
        );
        assert_eq!(
            e.evaluate(&check, &json!({"amount":-1,"currency":"EUR"}))
                .unwrap(),
            json!(false)
        );
        assert_eq!(
            e.evaluate(&check, &json!({"amount":1,"currency":"EURO"}))
                .unwrap(),
            json!(false)
        );
        let units = e.compile("minor_units('KWD')").unwrap();
        assert_eq!(e.evaluate(&units, &json!(null)).unwrap(), json!(3));
    }

    #[test]
    fn compile_rejects_syntax_errors_and_unknown_functions() {
        let e = engine();
        assert!(e.compile("a.[").is_err());
        let err = e.compile("{a: to_major(x)}").unwrap_err();
        assert!(err.contains("to_major"), "{err}");
        assert!(e.compile("length(@)").is_ok());
    }
}
